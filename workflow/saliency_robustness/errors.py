"""Errors that the pipeline reports to the user as one line, without a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    def __init__(self, message: str = "") -> None:
        # raised in a DataLoader worker, it comes back built from the worker's traceback
        # ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep the
        # traceback's last line, the original message
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class ConfigError(PipelineError):
    """The configuration does not match the schema."""


class DataError(PipelineError):
    """A dataset is missing or unreadable."""


class StoreError(PipelineError):
    """A Zarr store is missing, corrupt or lacks a variable it should hold."""


class TrainingDiverged(PipelineError):
    """The training loss became NaN or infinite."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text as one line: its lines joined by ``; ``, cut at ``limit`` characters.

    Third-party errors (zarr, torch, jsonschema, urllib) often span lines; a
    :class:`PipelineError` built from one must still print as one line.
    """
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
