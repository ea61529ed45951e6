"""sync: snapshots of a run (checkpoints, metrics, cache shards) to a folder or Google Drive, off the training thread.

The runner's whole interface is open_sync(...) -> Sync with restore_latest(), on_checkpoint(HandOver) and
close().
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from sync.config import SyncConfig
from sync.errors import SyncError
from sync.handover import HandOver, load_record, save_record

__all__ = ["SyncConfig", "SyncError", "HandOver", "Sync", "open_sync"]
log = logging.getLogger("sync")
STATE_DIR = ".sync"  # under the run dir; never part of a snapshot
HAND_OVER_RECORD = "hand_over.json"  # in STATE_DIR: the last hand-over, so `python -m sync push` can resend it


class Sync:
    """The runner's handle on sync; every method is a cheap no-op when sync is off."""

    def __init__(self, config: SyncConfig, run_dir: Path, cache_dir: Path, run_id: str, backend=None,
                 start_uploader: bool = True):
        self.config, self.run_dir, self.cache_dir, self.run_id = config, Path(run_dir), Path(cache_dir), run_id
        self.enabled = backend is not None
        self.backend = backend
        self.state_dir = self.run_dir / STATE_DIR
        self._uploader, self._started = None, False
        if self.enabled:
            from sync.staging import Staging
            from sync.uploader import Uploader
            self.staging = Staging(self.state_dir / "staged")
            self.staging.clean_partial()
            self._uploader = Uploader(backend, self.staging, self.cache_dir, self.state_dir, config.keep)
            if start_uploader:
                self._start()

    def _start(self) -> None:
        """Start the background uploader (it first sends what an earlier process left staged)."""
        if self._started:
            return
        pending = self.staging.pending()
        if pending:
            log.info("%d snapshot(s) left staged by an earlier process; sending the newest (step %d)",
                     len(pending), pending[-1].step)
        self._uploader.start()
        self._started = True

    def last_hand_over(self) -> HandOver | None:
        """The last checkpoint the runner handed over in this run dir (sync's own record), or None."""
        return load_record(self.state_dir / HAND_OVER_RECORD)

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

    def on_checkpoint(self, hand_over: HandOver) -> None:
        """Record a finished checkpoint and stage a copy of it now; it is packed and uploaded in the background.

        The record is kept even when sync is off (if the run dir exists), so `python -m sync push` can
        send the newest checkpoint later."""
        if self.run_dir.is_dir():
            save_record(self.state_dir / HAND_OVER_RECORD, hand_over)
        if not self.enabled:
            return
        info = {"run_id": self.run_id, "created": time.time(), "metrics": hand_over.metrics,
                "val_accuracy": hand_over.val_accuracy, "val_loss": hand_over.metrics.get("val_loss"),
                "runner_version": hand_over.runner_version, "cache_files": list(hand_over.cache_files)}
        try:
            self.staging.stage(self.run_dir, hand_over, info)
        except (OSError, SyncError) as e:
            log.error("could not stage checkpoint step %s (%s); it will not be uploaded", hand_over.step, e)
            return
        self._start()
        self._uploader.wake()

    def close(self, timeout: float | None = None) -> str:
        """Flush pending uploads for at most timeout seconds (default sync.flush_timeout_s); return the outcome."""
        if not self.enabled:
            return "sync: off (set sync.folder, or sync.backend=drive, to keep snapshots off this machine)"
        if not self._started:
            return f"sync: nothing sent ({self.backend.description})"
        return self._uploader.close(self.config.flush_timeout_s if timeout is None else timeout)


def open_sync(config: SyncConfig, run_dir: Path, cache_dir: Path, run_id: str, start_uploader: bool = True) -> Sync:
    """Validate config and the files it names, connect its backend, and (unless told not to) resume sending
    anything a previous process left staged."""
    if not config.enabled:
        return Sync(config, run_dir, cache_dir, run_id)
    config.validate()
    config.check_environment()
    from sync.backends import make_backend
    backend = make_backend(config, Path(run_dir) / STATE_DIR / "transfers")
    return Sync(config, run_dir, cache_dir, run_id, backend, start_uploader)
