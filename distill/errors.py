"""Errors the user can fix: a bad argument, a missing file, a file that cannot be used.

Their message is one line that names the argument or the file, says what was expected and how to fix
it. ``distill``'s entry point (:func:`distill.cli.main`) prints that line alone, without a traceback,
for any exception of these types (also when Lightning or jsonargparse wrapped it); every other
exception is a bug and keeps its traceback. ``--debug`` or ``DISTILL_DEBUG=1`` shows the traceback of
a user error too. Each type also derives from the built-in exception it refines, so
``except ValueError`` and ``except FileNotFoundError`` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors :func:`distill.cli.main` reports in one line."""


class ConfigError(UserError, ValueError):
    """An argument (or a combination of arguments) that cannot work: the value given and the one expected."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory an argument names does not exist."""


class BadFileError(UserError, ValueError):
    """A file exists but cannot be used: damaged, truncated, of another format, or not writable."""


class UnknownNameError(UserError, KeyError):
    """A name (of a model, ...) that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingPackageError(UserError, ImportError):
    """An optional dependency an argument needs is not installed: how to install it, or what to use instead."""


def find_user_error(error: BaseException | None) -> UserError | None:
    """``error`` itself or the first :class:`UserError` it was raised from (the ``raise ... from`` chain,
    e.g. jsonargparse wrapping a constructor's error); ``None`` for anything else."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None
