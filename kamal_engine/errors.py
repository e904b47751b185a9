"""Errors a user sees.

Every error raised for bad input is a :class:`KamalError` whose message is a sentence: what went
wrong, with which file, and what to do. The CLI prints the message on one line and exits non-zero;
the app shows it in a dialog.
"""

from __future__ import annotations

from pathlib import Path


class KamalError(Exception):
    """A problem with the user's input (files, options), explained in the message."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)

    def __reduce__(self):  # survives pickling (the app's engine process sends errors back): sentence and path
        return _restore_error, (type(self), self.args[0] if self.args else "", self.path)


def _restore_error(cls: type, text: str, path: Path | None) -> "KamalError":
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    error.path = path
    return error


class CheckpointError(KamalError):
    """A checkpoint file cannot be used as a teacher (or student)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled Python objects and the caller did not say it trusts the file."""


class DataError(KamalError):
    """An image folder, image file or label file cannot be used."""


class DivergedError(KamalError):
    """The training produced a loss (or weights) that is not a finite number: where, so the run can say it."""

    def __init__(self, message: str, stage: str | None = None, block: int | None = None, step: int | None = None):
        super().__init__(message)
        self.stage, self.block, self.step = stage, block, step


class DiskFullError(KamalError):
    """A file could not be written for lack of disk space (or quota); nothing half-written is left."""


class OutOfMemoryError(KamalError):
    """The device ran out of memory; the message suggests a batch size that fits."""
