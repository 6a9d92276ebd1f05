"""Errors raised for bad user input. Each message names the key, file or value and what would be valid."""


class SlcaKitError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class ConfigError(SlcaKitError):
    """A recipe key, type or value is invalid."""


class DataError(SlcaKitError):
    """A dataset file, folder, column or label set does not match what the recipe declares."""


class CheckpointError(SlcaKitError):
    """A checkpoint or weights file is missing, incomplete or does not match the model."""


class UnreadableImage(DataError):
    """An image file that cannot be decoded; ``source`` is its path (or split[index])."""

    def __init__(self, split: str, source: str, reason: str):
        super().__init__(f"{split}: cannot decode image {source}: {reason} "
                         "(data.bad_images: skip leaves unreadable images out)")
        self.source = source
        self.reason = reason


class TrainingDiverged(SlcaKitError):
    """A loss, parameter, statistic or logit became NaN or infinite."""


class RunFolderBusy(SlcaKitError):
    """Another live process is writing the run folder."""


class Preempted(SlcaKitError):
    """SIGTERM or SIGINT stopped the run at a safe point after writing a checkpoint; ``--resume`` continues it."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


def first_line(err: Exception) -> str:
    """A library's message can run over several lines; an ``error:`` line keeps the first."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
