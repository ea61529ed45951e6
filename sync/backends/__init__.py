"""Storage backends: one small interface (put, get, list, delete with properties), two implementations."""
from __future__ import annotations

from pathlib import Path

from sync.backends.base import Backend, RemoteFile
from sync.config import SyncConfig
from sync.retry import RetryPolicy

__all__ = ["Backend", "RemoteFile", "make_backend"]


def make_backend(config: SyncConfig, state_dir: Path) -> Backend:
    """The backend named by config.backend; state_dir holds local transfer state (upload sessions)."""
    if config.backend == "folder":
        from sync.backends.folder import FolderBackend
        return FolderBackend(Path(config.folder).expanduser())
    from sync.backends.drive import DriveBackend
    retry = RetryPolicy(tries=config.retries, backoff_s=config.backoff_s)
    return DriveBackend(config, state_dir, retry)
