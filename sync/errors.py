"""sync's errors, under the one project root (common/errors.py): each message names the setting or file and
the fix, each class carries its exit status."""
from __future__ import annotations

from common.errors import NothingToDo, ProjectError, TransientError


class SyncError(ProjectError):
    """A sync problem the user can act on; the message says what to do. Shown as `sync: MESSAGE` (the logs'
    `sync:` is the logger's name)."""
    origin = "sync"


class TransferError(SyncError, TransientError):
    """A network transfer still failed after the retry policy's last try (exit status 75)."""


class NotSent(SyncError, TransientError):
    """The newest checkpoint handed over is still not on the remote after the uploader's last try (exit 75)."""


class RemoteError(SyncError):
    """The remote refused a request for good (not worth retrying now); carries its HTTP status and reasons."""

    def __init__(self, message: str, status: int | None = None, reasons: frozenset[str] = frozenset()):
        super().__init__(message)
        self.status, self.reasons = status, reasons


class NotFound(SyncError):
    """The named file is not on the remote (or not visible to these credentials)."""


class NoSnapshots(SyncError, NothingToDo):
    """The remote holds no snapshot to restore (exit status 66)."""


class QuotaExceeded(RemoteError):
    """The remote has no space left for this upload."""


class IntegrityError(SyncError):
    """Data did not match its checksum or its manifest, or an archive is unsafe."""
