"""Errors raised for bad user input. Each message names the key, file or value and what would be valid."""


class SlcaKitError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class ConfigError(SlcaKitError):
    """A recipe key, type or value is invalid."""


class DataError(SlcaKitError):
    """A dataset file, folder, column or label set does not match what the recipe declares."""


class CheckpointError(SlcaKitError):
    """A checkpoint or weights file is missing, incomplete or does not match the model."""
