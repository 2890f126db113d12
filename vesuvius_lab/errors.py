"""Errors that reach the user as one line each, never as a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class VLabError(Exception):
    """A problem with the user's input; ``lines`` holds one message per problem."""

    def __init__(self, lines: str | Iterable[str]):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class DataError(VLabError):
    """A data file is missing, malformed or inconsistent."""


class ConfigError(VLabError):
    """A config or manifest key is unknown, missing or of the wrong type."""
