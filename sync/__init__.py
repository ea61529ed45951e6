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
from sync.outcome import OUTCOME_RECORD, SyncOutcome

__all__ = ["SyncConfig", "SyncError", "HandOver", "Sync", "SyncOutcome", "open_sync"]
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
        self._last_error: str | None = None  # a hand-over that could not be staged (so is not on its way)
        self._restored_step: int | None = None  # the snapshot restore_latest brought onto this machine
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
        self._restored_step = restore_latest(self.backend, self.run_dir, self.cache_dir, self.state_dir / "download",
                                             run_id=self.run_id, on_bad_cache=self._uploader.reupload)
        return self._restored_step

    def download_latest(self, dest: Path) -> int | None:
        """Extract the newest verified remote snapshot into dest, without the bottleneck cache (to use its
        export elsewhere); return its step, or None if the remote has none."""
        if not self.enabled:
            return None
        from sync.restore import restore_latest
        return restore_latest(self.backend, Path(dest), None, Path(dest) / STATE_DIR / "download")

    def holds_final(self, step: int) -> bool:
        """Whether the run's final snapshot of step is on the remote or staged here on its way there (a remote
        that cannot be asked counts as not holding it: staging it again costs only local links)."""
        if not self.enabled:
            return True
        if any(s.step == step and s.hand_over.final for s in self.staging.pending()):
            return True
        from sync.remote import snapshot_on_remote
        try:
            return snapshot_on_remote(self.backend, step, True)
        except SyncError as e:
            log.warning("could not check the remote for the final snapshot of step %d: %s", step,
                        str(e))
            return False

    def on_checkpoint(self, hand_over: HandOver) -> None:
        """Record a finished checkpoint and stage a copy of it now; it is packed and uploaded in the background.

        The record is kept even when sync is off (if the run dir exists), so `python -m sync push` can
        send the newest checkpoint later."""
        if self.run_dir.is_dir():
            save_record(self.state_dir / HAND_OVER_RECORD, hand_over)
        if not self.enabled:
            return
        try:
            self.staging.stage(self.run_dir, hand_over, self.run_id, created=time.time())
        except (OSError, SyncError) as e:
            self._last_error = f"could not stage checkpoint step {hand_over.step} ({e})"
            log.error("%s; it will not be uploaded", self._last_error)
            return
        self._last_error = None
        self._start()
        self._uploader.wake()

    def close(self, timeout: float | None = None) -> SyncOutcome:
        """Flush pending uploads for at most timeout seconds (default sync.flush_timeout_s; the uploader tries
        once more after an earlier failure), then say whether the newest checkpoint handed over is on the remote."""
        if not self.enabled:
            return SyncOutcome(False, "sync: off (set sync.folder, or sync.backend=drive, to keep snapshots off "
                                      "this machine)")
        if self._started:
            self._uploader.close(self.config.flush_timeout_s if timeout is None else timeout)
        outcome = self._outcome()
        if self.run_dir.is_dir():
            try:
                outcome.save(self.state_dir / OUTCOME_RECORD)
            except OSError as e:
                log.warning("could not record the sync outcome in %s: %s", self.state_dir, e)
        return outcome

    def _outcome(self) -> SyncOutcome:
        """The outcome after the uploader stopped (or ran out of time)."""
        where, uploader = self.backend.description, self._uploader
        try:
            record = self.last_hand_over()
        except SyncError as e:
            record, self._last_error = None, str(e)
        pending = self.staging.pending()
        if pending and not uploader.still_uploading:  # the worker ended: only the newest is worth sending
            for old in pending[:-1]:
                self.staging.remove(old)
            pending = pending[-1:]
        step = record.step if record else (pending[-1].step if pending else uploader.last_sent)
        final = bool(record and record.final)
        error = uploader.last_error or self._last_error
        common = dict(enabled=True, remote=where, step=step, final=final, pending=len(pending),
                      local=str(pending[-1].path if pending else self.run_dir))
        if pending:
            reason = "still uploading when the timeout ran out" if uploader.still_uploading else \
                (error or "not sent")
            return SyncOutcome(message=f"sync: {len(pending)} snapshot(s) still pending (newest step "
                                       f"{pending[-1].step}; {reason}): they stay queued locally and will be sent "
                                       f"on the next run or by `python -m sync push`",
                               on_remote=False, last_error=error, **common)
        if uploader.last_sent is not None and uploader.last_sent == step and self._last_error is None:
            note = f"; {self.backend.note}" if self.backend.note else ""
            return SyncOutcome(message=f"sync: snapshot step {step} uploaded and verified ({where}){note}",
                               on_remote=True, **common)
        if record is None and self._restored_step is not None and not error:
            # a fresh machine that restored a run and handed nothing over: done if what it restored is the final
            from sync.remote import snapshot_on_remote
            try:
                if snapshot_on_remote(self.backend, self._restored_step, True):
                    return SyncOutcome(message=f"sync: nothing new to upload ({where}; the final snapshot of step "
                                               f"{self._restored_step} is there)", on_remote=True,
                                       **{**common, "step": self._restored_step, "final": True})
            except SyncError as e:
                error = str(e)
        if record is None:
            message = f"sync: nothing sent ({where}): {error}" if error else \
                f"sync: nothing new to upload ({where}; no checkpoint handed over here yet)"
            return SyncOutcome(message=message, on_remote=False, last_error=error, **common)
        if self._last_error is None:
            from sync.remote import snapshot_on_remote
            try:
                if snapshot_on_remote(self.backend, record.step, record.final):
                    return SyncOutcome(message=f"sync: nothing new to upload ({where})", on_remote=True, **common)
            except SyncError as e:
                error = str(e)
        return SyncOutcome(message=f"sync: the last checkpoint handed over (step {record.step}) is not in {where}"
                                   f" ({(error or 'not sent')})",
                           on_remote=False, last_error=error or "not sent", **common)


def recorded_outcome(run_dir: Path) -> SyncOutcome | None:
    """What the last process to close sync in run_dir left (None when none recorded it)."""
    return SyncOutcome.load(Path(run_dir) / STATE_DIR / OUTCOME_RECORD)


def open_sync(config: SyncConfig, run_dir: Path, cache_dir: Path, run_id: str, start_uploader: bool = True) -> Sync:
    """Validate config and the files it names, connect its backend, check that the backend can describe this
    run's snapshots, and (unless told not to) resume sending anything a previous process left staged."""
    if not config.enabled:
        return Sync(config, run_dir, cache_dir, run_id)
    config.validate()
    config.check_environment()
    from sync.backends import make_backend
    from sync.remote import SnapshotInfo, snapshot_name
    backend = make_backend(config, Path(run_dir) / STATE_DIR / "transfers")
    example = SnapshotInfo(snapshot_name(0, run_id), 0, None, "0" * 64, 0, time.time(), run_id=run_id, final=True)
    backend.check_properties(example.name, example.properties())  # a run id Drive cannot store: said at once
    return Sync(config, run_dir, cache_dir, run_id, backend, start_uploader)
