"""Exceptions users see: each carries a message that says what went wrong and what to do."""


class AltI2VError(Exception):
    """A failure the user can act on; the CLI prints it without a traceback and exits 1."""


class UsageError(AltI2VError):
    """Wrong or conflicting options; the CLI exits 2."""


class ImageLoadError(AltI2VError):
    """One image could not be used. ``reason`` is a short stable code for reports."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class UnsafePathError(AltI2VError):
    """A path from a data file or the network points outside the data directory."""


class StoreMismatchError(AltI2VError):
    """A store was opened with a vocabulary or image settings it was not built with."""


class BadRecordError(AltI2VError):
    """A store record that does not decode to what the store's meta promises (damaged or foreign)."""
