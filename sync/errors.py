"""The user-facing error type of sync: its message names the setting or file and the fix."""
from __future__ import annotations


class SyncError(Exception):
    """A sync problem the user can act on; the message says what to do."""


class TransferError(SyncError):
    """A network transfer still failed after the retry policy's last try."""


class RemoteError(SyncError):
    """The remote refused a request for good (not worth retrying now); carries its HTTP status and reasons."""

    def __init__(self, message: str, status: int | None = None, reasons: frozenset[str] = frozenset()):
        super().__init__(message)
        self.status, self.reasons = status, reasons


class NotFound(SyncError):
    """The named file is not on the remote (or not visible to these credentials)."""


class QuotaExceeded(RemoteError):
    """The remote has no space left for this upload."""


class IntegrityError(SyncError):
    """Data did not match its checksum or its manifest, or an archive is unsafe."""
