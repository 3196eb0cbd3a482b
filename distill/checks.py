"""Argument checks shared by every term, method, callback and DataModule.

Each check raises a ``ValueError`` whose one line names the owner and the argument, the value given
and what was expected, e.g. ``KDTerm temperature=-4: expected a number > 0``. Checks run in
constructors, so a bad value fails before any run directory or data exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def _fail(owner: str, key: str, value, expected: str) -> None:
    raise ValueError(f"{owner} {key}={value!r}: expected {expected}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(owner: str, key: str, value) -> None:
    """A finite number > 0 (temperatures, learning rates, epochs as counts)."""
    if not _is_number(value) or value <= 0:
        _fail(owner, key, value, "a number > 0")


def non_negative(owner: str, key: str, value) -> None:
    """A finite number >= 0 (loss weights, weight decay, warm-up lengths)."""
    if not _is_number(value) or value < 0:
        _fail(owner, key, value, "a number >= 0")


def fraction(owner: str, key: str, value, *, zero: bool = False, one: bool = True) -> None:
    """A number in (0, 1], or [0, 1] with ``zero``, or (0, 1) without ``one``."""
    low_ok = value >= 0 if zero else value > 0
    high_ok = value <= 1 if one else value < 1
    if not _is_number(value) or not (low_ok and high_ok):
        _fail(owner, key, value, f"a fraction in {'[' if zero else '('}0, 1{']' if one else ')'}")


def choice(owner: str, key: str, value, choices: Iterable) -> None:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        _fail(owner, key, value, "one of " + ", ".join(map(repr, choices)))


def positive_ints(owner: str, key: str, values: Sequence, length: int | None = None) -> None:
    """A non-empty list of integers > 0 (epochs per stage), of ``length`` entries where given."""
    ok = (
        isinstance(values, Sequence)
        and len(values) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    )
    if not ok or (length is not None and len(values) != length):
        count = f"{length} " if length is not None else "a list of "
        _fail(owner, key, list(values) if isinstance(values, Sequence) else values, f"{count}integers > 0")
