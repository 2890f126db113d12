"""Errors that reach the user as one line each, never as a traceback, and the exit codes they map to.

Every subcommand exits with one of these: 0 done; 1 an internal error (a bug: ``VLAB_DEBUG=1``
shows the traceback); 2 refused: bad input, config or data, a locked run folder, a run that failed
(one ``error:`` line per problem, nothing of the user's changed); 3 stopped by SIGINT or SIGTERM
before the end, with what was finished kept (``train --resume`` continues a run, ``predict`` and
``cache build`` continue when run again).
"""

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


EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as SIGINT raises KeyboardInterrupt: both stop a command."""

    signal = "SIGTERM"
