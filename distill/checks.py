"""Argument checks shared by every term, method, callback, schedule and DataModule.

Each check raises a :class:`~distill.errors.ConfigError` (a ``ValueError``) whose one line names the
owner and the argument, the value given and what was expected, e.g.
``KDTerm temperature=-4: expected a number > 0``. Checks run in constructors, so a bad value fails
before any run directory or data exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .errors import ConfigError


def fail(owner: str, key: str, value, expected: str) -> None:
    """Raise the one-line error of every check: ``<owner> <key>=<value>: expected <expected>``."""
    raise ConfigError(f"{owner} {key}={value!r}: expected {expected}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(owner: str, key: str, value) -> None:
    """A finite number > 0 (temperatures, learning rates)."""
    if not _is_number(value) or value <= 0:
        fail(owner, key, value, "a number > 0")


def non_negative(owner: str, key: str, value) -> None:
    """A finite number >= 0 (loss weights, weight decay, warm-up lengths)."""
    if not _is_number(value) or value < 0:
        fail(owner, key, value, "a number >= 0")


def positive_int(owner: str, key: str, value) -> None:
    """An integer > 0 (batch sizes, dimensions, counts)."""
    if not _is_int(value) or value <= 0:
        fail(owner, key, value, "an integer > 0")


def non_negative_int(owner: str, key: str, value) -> None:
    """An integer >= 0 (workers, padding, warm-up epochs)."""
    if not _is_int(value) or value < 0:
        fail(owner, key, value, "an integer >= 0")


def fraction(owner: str, key: str, value, *, zero: bool = False, one: bool = True) -> None:
    """A number in (0, 1], or [0, 1] with ``zero``, or (0, 1) without ``one``."""
    ok = _is_number(value) and (value >= 0 if zero else value > 0) and (value <= 1 if one else value < 1)
    if not ok:
        fail(owner, key, value, f"a fraction in {'[' if zero else '('}0, 1{']' if one else ')'}")


def choice(owner: str, key: str, value, choices: Iterable) -> None:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        fail(owner, key, value, "one of " + ", ".join(map(repr, choices)))


def positive_ints(owner: str, key: str, values: Sequence, length: int | None = None) -> None:
    """A non-empty list of integers > 0 (epochs per stage), of ``length`` entries where given."""
    ok = isinstance(values, Sequence) and len(values) > 0 and all(_is_int(v) and v > 0 for v in values)
    if not ok or (length is not None and len(values) != length):
        count = f"{length} " if length is not None else "a list of "
        fail(owner, key, list(values) if isinstance(values, Sequence) else values, f"{count}integers > 0")


def ordered(owner: str, key: str, values: Sequence, *, strict: bool = False, descending: bool = False) -> None:
    """A non-empty list of finite numbers that never decreases (``strict``: increases; ``descending``:
    never increases / decreases)."""
    values = list(values) if isinstance(values, Sequence) else values
    pairs = list(zip(values, values[1:])) if isinstance(values, list) else []
    if descending:
        pairs = [(b, a) for a, b in pairs]
    ok = (
        isinstance(values, list)
        and len(values) > 0
        and all(_is_number(v) for v in values)
        and all(a < b if strict else a <= b for a, b in pairs)
    )
    if not ok:
        trend = {(0, 0): "non-decreasing", (0, 1): "non-increasing", (1, 0): "increasing", (1, 1): "decreasing"}
        trend = trend[strict, descending]
        fail(owner, key, values, f"a non-empty {trend} list of numbers")


def sums_to(owner: str, key: str, values: Sequence, total: int, total_key: str) -> None:
    """``values`` (epochs per stage) add up to ``total`` (``trainer.max_epochs``)."""
    if sum(values) != total:
        fail(owner, key, list(values), f"entries summing to {total_key}={total} (they sum to {sum(values)})")
