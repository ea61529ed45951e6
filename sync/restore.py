"""Restore: download the newest good snapshot, verify, extract into the run dir, fetch missing cache shards."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from sync.backends.base import Backend
from sync.errors import IntegrityError, SyncError, TransferError
from sync.remote import SnapshotInfo, cache_name, restore_candidates
from sync.snapshot import check_relpath, extract, file_digest

log = logging.getLogger("sync")


def fetch_snapshot(backend: Backend, snap: SnapshotInfo, work_dir: Path) -> tuple[Path, dict]:
    """Download and verify snap, extract it into a fresh folder under work_dir; return (folder, manifest)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    archive = work_dir / snap.name
    backend.get(snap.name, archive, file_id=snap.file_id)
    dest = work_dir / f"extracted-{snap.step:09d}"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        manifest = extract(archive, dest, expected_sha256=snap.sha256 or None)
    finally:
        archive.unlink(missing_ok=True)
    return dest, manifest


def move_into_place(src: Path, manifest: dict, run_dir: Path) -> None:
    """Move every extracted member into run_dir (same filesystem: each move is an atomic rename)."""
    for rel in manifest["files"]:
        target = run_dir / check_relpath(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src / rel, target)
    shutil.rmtree(src, ignore_errors=True)


def fetch_cache(backend: Backend, manifest: dict, cache_dir: Path) -> int:
    """Download the manifest's cache shards missing from cache_dir, each verified by sha256; return the count."""
    fetched = 0
    for rel, sha in sorted(manifest.get("cache", {}).items()):
        target = cache_dir / check_relpath(rel)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.download")
        backend.get(cache_name(sha), tmp)
        if file_digest(tmp) != sha:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"sync: cache shard {rel} downloaded with the wrong sha256; not used (it will "
                                 f"be recomputed).")
        os.replace(tmp, target)
        fetched += 1
    return fetched


def restore_latest(backend: Backend, run_dir: Path, cache_dir: Path | None, work_dir: Path) -> int | None:
    """Restore the newest snapshot that verifies into run_dir and its cache into cache_dir (None: leave the
    cache on the remote); return its step."""
    candidates = restore_candidates(backend)
    for snap in candidates:
        try:
            extracted, manifest = fetch_snapshot(backend, snap, work_dir)
        except IntegrityError as e:
            log.warning("snapshot %s skipped: %s", snap.name, str(e).removeprefix("sync: "))
            continue
        except TransferError:
            raise
        except SyncError as e:  # e.g. listed but deleted meanwhile
            log.warning("snapshot %s skipped: %s", snap.name, str(e).removeprefix("sync: "))
            continue
        move_into_place(extracted, manifest, run_dir)
        if cache_dir is None:
            log.info("restored step %d from %s", snap.step, snap.name)
            return int(manifest["step"])
        try:
            n = fetch_cache(backend, manifest, cache_dir)
            log.info("restored step %d from %s (%d cache shards downloaded)", snap.step, snap.name, n)
        except SyncError as e:
            log.warning("restored step %d but not all of its cache: %s", snap.step, str(e).removeprefix("sync: "))
        return int(manifest["step"])
    if candidates:
        raise IntegrityError(f"sync: none of the {len(candidates)} snapshots on the remote passed verification; "
                             f"nothing was restored (see the warnings above).")
    return None
