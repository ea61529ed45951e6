"""The user-facing error type of sync: its message names the setting or file and the fix."""
from __future__ import annotations


class SyncError(Exception):
    """A sync problem the user can act on; the message says what to do."""


class TransferError(SyncError):
    """A network transfer still failed after the retry policy's last try."""


class QuotaExceeded(SyncError):
    """The remote has no space left for this upload."""


class IntegrityError(SyncError):
    """Data did not match its checksum or its manifest, or an archive is unsafe."""
