"""The background uploader: sends staged checkpoints (newest only), verifies, updates the pointer, prunes."""
from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

from sync.backends.base import Backend
from sync.errors import SyncError
from sync.remote import (SnapshotInfo, cache_name, check_owner, prune, read_pointer, remote_cache, snapshot_name,
                         write_pointer)
from sync.snapshot import check_relpath, file_digest, local_content, manifest_content, pack
from sync.staging import Staged, Staging
from common.files import write_text_atomic

log = logging.getLogger("sync")
RETRY_AFTER_FAILURE_S = 300.0
REUPLOAD = "reupload.json"  # under the state dir: sha256 of cache shards whose remote copy must be sent again


class Uploader:
    """Owns the worker thread; the training thread only calls wake() (after staging) and close()."""

    def __init__(self, backend: Backend, staging: Staging, cache_dir: Path, work_dir: Path, keep: int):
        self.backend, self.staging, self.cache_dir = backend, staging, cache_dir
        self.work_dir, self.keep = work_dir, keep
        self._cond = threading.Condition()
        self._wakeups = 0
        self._stopping = False
        self._remote_cache: set[str] | None = None
        self._owner_checked = False
        self._reupload_path = work_dir / REUPLOAD
        self._reupload = _read_names(self._reupload_path)
        self._digests: dict[tuple, str] = {}
        self.last_sent: int | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="sync-uploader", daemon=True)

    def start(self) -> None:
        """Start the worker (it first sends what a previous process left staged)."""
        self._thread.start()

    def wake(self) -> None:
        """Tell the worker a new checkpoint is staged."""
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Let the worker send what is pending for at most timeout seconds (its last try: it stops after
        a failure); `still_uploading`, `last_sent` and `last_error` then say how it ended."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def still_uploading(self) -> bool:
        """The worker is still running (close()'s timeout ran out during an upload)."""
        return self._thread.is_alive()

    def reupload(self, shas: set[str]) -> None:
        """Send these cache shards again at the next upload (a restore found their remote copy corrupt or gone)."""
        with self._cond:
            self._reupload |= set(shas)
            if self._remote_cache is not None:
                self._remote_cache -= self._reupload
            _write_names(self._reupload_path, self._reupload)

    def _run(self) -> None:
        failed = False
        while True:
            with self._cond:
                seen = self._wakeups
                pending = self.staging.pending()
                if failed and not self._stopping:
                    # after a failure, wait for a new checkpoint, close(), or the retry interval
                    self._cond.wait_for(lambda: self._wakeups != seen or self._stopping,
                                        timeout=RETRY_AFTER_FAILURE_S)
                    pending = self.staging.pending()
                if not pending:
                    if self._stopping:
                        return
                    self._cond.wait_for(lambda: self._wakeups != seen or self._stopping)
                    continue
                final_try = self._stopping
            newest = pending[-1]
            for old in pending[:-1]:
                log.info("step %d superseded by step %d before it was sent (coalesced)", old.step,
                         newest.step)
                self.staging.remove(old)
            try:
                self.send(newest)
                self.staging.remove(newest)
                self.last_sent, self.last_error, failed = newest.step, None, False
            except SyncError as e:  # RemoteError, TransferError (after its retries), ...: retried later
                self.last_error, failed = str(e), True
                later = " Sync is closing: the snapshot stays queued on this machine." if final_try else \
                    " Training continues; the snapshot stays queued and is retried later."
                log.error("%s%s", self.last_error, later)
            except Exception as e:  # never let the worker die: training must not notice
                self.last_error, failed = f"{type(e).__name__}: {e}", True
                log.exception("unexpected error while sending step %d", newest.step)
            if final_try and failed:
                return

    def send(self, staged: Staged) -> SnapshotInfo:
        """Upload staged's cache shards and snapshot, verify it, move the pointer, then prune older ones."""
        hand_over = staged.hand_over
        if not self._owner_checked:
            check_owner(self.backend, staged.run_id, read_pointer(self.backend))
            self._owner_checked = True
        cache = self._upload_cache(hand_over.cache_files)
        name = snapshot_name(staged.step, staged.run_id)
        archive = self.work_dir / "outgoing" / f"{staged.path.name}-{int(staged.staged * 1e6)}.tar.gz"
        manifest = {"step": hand_over.step, "val_accuracy": hand_over.val_accuracy,
                    "val_loss": hand_over.metrics.get("val_loss"), "metrics": hand_over.metrics,
                    "run_id": staged.run_id, "created": staged.created, "runner_version": hand_over.runner_version,
                    "final": hand_over.final, "cache": cache}
        clear_outgoing(self.work_dir, {archive.name})
        if archive.exists():  # packed by an earlier try
            content = local_content(staged.path / "files", hand_over.files)
        else:
            content = manifest_content(pack(staged.path / "files", list(hand_over.files), manifest, archive))
        snap = SnapshotInfo(name, staged.step, hand_over.val_accuracy, file_digest(archive),
                            archive.stat().st_size, staged.created, run_id=staged.run_id, final=hand_over.final,
                            content=content)
        snap.file_id = self.backend.put(name, archive, snap.properties()).id
        write_pointer(self.backend, snap, self.work_dir / "outgoing")
        log.info("snapshot step %d uploaded and verified (%s)", snap.step, self.backend.description)
        archive.unlink(missing_ok=True)
        self._publish(staged)
        try:
            prune(self.backend, self.keep, verified_step=snap.step)
        except SyncError as e:  # the snapshot is safe; retention is retried after the next one
            log.warning("snapshot step %d is safe, but old snapshots could not be deleted: %s", snap.step,
                        str(e))
        return snap

    def _publish(self, staged: Staged) -> None:
        """Copy the files the hand-over names as published (the final export and report) as plain files next
        to the snapshot (readable in Drive's web page); a failure here costs only the copies, never the snapshot."""
        for rel in staged.hand_over.published:
            try:
                self.backend.put(rel, staged.path / "files" / rel, {})
            except SyncError as e:
                log.warning("snapshot step %d is safe, but its plain copy of %s failed: %s", staged.step, rel,
                            str(e))
                return

    def _upload_cache(self, rels: tuple[str, ...]) -> dict[str, str]:
        """Upload each cache shard not yet on the remote (named by its sha256); return {relpath: sha256}."""
        if rels and self._remote_cache is None:
            self._remote_cache = remote_cache(self.backend) - self._reupload
        out = {}
        for rel in sorted(set(rels)):
            path = self.cache_dir / check_relpath(rel)
            try:
                st = path.stat()
            except FileNotFoundError:
                log.warning("cache file %s is gone; the snapshot is sent without it (it would be "
                            "recomputed after a restore)", rel)
                continue
            key = (rel, st.st_size, st.st_mtime_ns)
            sha = self._digests.get(key) or file_digest(path)
            self._digests[key] = sha
            if sha not in self._remote_cache:
                self.backend.put(cache_name(sha), path, {})  # the name is its sha256: it needs no properties
                self._remote_cache.add(sha)
                if sha in self._reupload:
                    with self._cond:
                        self._reupload.discard(sha)
                        _write_names(self._reupload_path, self._reupload)
            out[rel] = sha
        return out


def clear_outgoing(work_dir: Path, keep_names: set[str]) -> None:
    """Remove packed archives no staged checkpoint needs any more."""
    outgoing = work_dir / "outgoing"
    if outgoing.is_dir():
        for path in outgoing.iterdir():
            if path.name not in keep_names:
                path.unlink(missing_ok=True) if path.is_file() else shutil.rmtree(path, ignore_errors=True)


def _read_names(path: Path) -> set[str]:
    """A JSON list of names (empty if the file is missing or unreadable)."""
    try:
        return set(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return set()


def _write_names(path: Path, names: set[str]) -> None:
    """Write names as a JSON list atomically; an empty set removes the file."""
    if not names:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(sorted(names)))
