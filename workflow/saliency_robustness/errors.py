"""Errors that the pipeline reports to the user as one line, without a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class ConfigError(PipelineError):
    """The configuration does not match the schema."""


class DataError(PipelineError):
    """A dataset is missing or unreadable."""


class StoreError(PipelineError):
    """A Zarr store is missing, corrupt or lacks a variable it should hold."""


class TrainingDiverged(PipelineError):
    """The training loss became NaN or infinite."""
