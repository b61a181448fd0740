"""Errors qzo raises for bad input: each names the problem and how to fix it.

The CLI prints these as one ``error:`` line (no traceback) and exits with status 2; from
Python they are ordinary exceptions. Anything else that escapes is a bug in qzo.
"""

from __future__ import annotations


class QzoError(Exception):
    """Bad input or a state a user can fix; the message says what and how."""


class ConfigError(QzoError, KeyError):
    """An unknown, mistyped or impossible configuration key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(QzoError, ValueError):
    """A dataset that cannot be used: missing, empty, malformed or without assistant turns."""


class ModelSourceError(QzoError, FileNotFoundError):
    """A model that cannot be found or read."""


class TargetError(QzoError, ValueError):
    """A target selection that cannot be built: a pattern matching nothing, a clash of names, ..."""


class NonFiniteLossError(QzoError, FloatingPointError):
    """A loss evaluation returned NaN or inf; the trainables were restored before raising."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def check_choice(what: str, value, choices) -> None:
    """Refuse ``value`` unless it is one of ``choices``, naming ``what`` and the choices (a :class:`QzoError`)."""
    if value not in choices:
        raise QzoError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")
