"""sync: snapshots of a run (checkpoints, metrics, cache shards) to a folder or Google Drive, off the training thread.

The runner's whole interface is open_sync(...) -> Sync with restore_latest(), on_checkpoint() and close().
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from sync.config import SyncConfig
from sync.errors import SyncError

__all__ = ["SyncConfig", "SyncError", "Sync", "open_sync"]
log = logging.getLogger("sync")
STATE_DIR = ".sync"  # under the run dir; never part of a snapshot
LAST_SNAPSHOT = "last_snapshot.json"  # written by the runner in the run dir: the last on_checkpoint call's
                                      # {step, files, metrics, cache_files}, so `python -m sync push` can resend it


class Sync:
    """The runner's handle on sync; every method is a cheap no-op when sync is off."""

    def __init__(self, config: SyncConfig, run_dir: Path, cache_dir: Path, run_id: str, backend=None):
        self.config, self.run_dir, self.cache_dir, self.run_id = config, Path(run_dir), Path(cache_dir), run_id
        self.enabled = backend is not None
        self.backend = backend
        self._uploader = None
        if self.enabled:
            from sync.staging import Staging
            from sync.uploader import Uploader
            self.state_dir = self.run_dir / STATE_DIR
            self.staging = Staging(self.state_dir / "staged")
            self.staging.clean_partial()
            self._uploader = Uploader(backend, self.staging, self.cache_dir, self.state_dir, config.keep)
            pending = self.staging.pending()
            if pending:
                log.info("%d snapshot(s) left staged by an earlier process; sending the newest (step %d)",
                         len(pending), pending[-1].step)
            self._uploader.start()

    def restore_latest(self) -> int | None:
        """Restore the newest verified remote snapshot (and its cache shards) into the run dir; return its step."""
        if not self.enabled:
            return None
        from sync.restore import restore_latest
        return restore_latest(self.backend, self.run_dir, self.cache_dir, self.state_dir / "download",
                              run_id=self.run_id, on_bad_cache=self._uploader.reupload)

    def download_latest(self, dest: Path) -> int | None:
        """Extract the newest verified remote snapshot into dest, without the bottleneck cache (to use its
        export elsewhere); return its step, or None if the remote has none."""
        if not self.enabled:
            return None
        from sync.restore import restore_latest
        return restore_latest(self.backend, Path(dest), None, Path(dest) / STATE_DIR / "download")

    def on_checkpoint(self, step: int, files: list[str], metrics: dict, cache_files: list[str]) -> None:
        """Stage a copy of a finished checkpoint now; it is packed and uploaded in the background."""
        if not self.enabled:
            return
        acc = metrics.get("val_accuracy")
        info = {"run_id": self.run_id, "created": time.time(), "metrics": _jsonable(metrics),
                "val_accuracy": None if acc is None else float(acc), "val_loss": _float(metrics.get("val_loss")),
                "runner_version": str(metrics.get("runner_version", "")), "cache_files": list(cache_files)}
        try:
            self.staging.stage(self.run_dir, int(step), files, info)
        except (OSError, SyncError) as e:
            log.error("could not stage checkpoint step %s (%s); it will not be uploaded", step, e)
            return
        self._uploader.wake()

    def close(self, timeout: float | None = None) -> str:
        """Flush pending uploads for at most timeout seconds (default sync.flush_timeout_s); return the outcome."""
        if not self.enabled:
            return "sync: off (set sync.folder, or sync.backend=drive, to keep snapshots off this machine)"
        return self._uploader.close(self.config.flush_timeout_s if timeout is None else timeout)


def _float(value) -> float | None:
    return None if value is None else float(value)


def _jsonable(metrics: dict) -> dict:
    """Metrics reduced to JSON-friendly numbers and strings."""
    out = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[str(k)] = v
        else:
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                out[str(k)] = str(v)
    return out


def open_sync(config: SyncConfig, run_dir: Path, cache_dir: Path, run_id: str) -> Sync:
    """Validate config, connect its backend, and resume sending anything a previous process left staged."""
    if not config.enabled:
        return Sync(config, run_dir, cache_dir, run_id)
    config.validate()
    from sync.backends import make_backend
    backend = make_backend(config, Path(run_dir) / STATE_DIR / "transfers")
    return Sync(config, run_dir, cache_dir, run_id, backend)
