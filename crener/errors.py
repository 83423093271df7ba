"""Errors that carry a message meant for the user; the CLI prints them without a traceback."""

from __future__ import annotations


class CrenerError(Exception):
    """A user-facing error (bad input, missing file, invalid configuration)."""


class DataError(CrenerError, ValueError):
    """Malformed or missing data. The message names the file and, where known, the line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = path if path is not None else ""
        if path is not None and line is not None:
            where = f"{path}:{line}"
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.line = line


class CheckpointError(CrenerError):
    """A checkpoint or encoder that is missing or cannot be loaded."""


class ConfigError(CrenerError, KeyError, ValueError):
    """An invalid configuration: an unknown key, a value of the wrong type, a value out of range
    or a combination that cannot be built. It is a ``KeyError`` and a ``ValueError`` too, so code
    that caught those (unknown keys, bad values) keeps working."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreError(CrenerError):
    """A tracking store (MLflow), study storage (Optuna) or Dask scheduler that cannot be reached
    or opened, or whose address names another kind of server."""


class UnreachableError(StoreError):
    """A server address where nothing answers (the connection is refused or times out): the
    server is down or the network is in the way, which is the environment, not the command; the
    command line exits with its environment status."""
