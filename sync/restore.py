"""Restore: download the newest good snapshot, verify, extract into the run dir, fetch missing cache shards."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from sync.backends.base import Backend
from sync.errors import IntegrityError, NotFound, RemoteError, SyncError
from sync.remote import SnapshotInfo, cache_name, legacy_cache_name, restore_candidates
from sync.snapshot import check_relpath, extract, file_digest
from common.files import replace_atomic

log = logging.getLogger("sync")


def unusable(e: SyncError) -> bool:
    """True when this one file cannot be used (corrupt, gone, refused by Drive) but others may be."""
    if isinstance(e, (IntegrityError, NotFound)):
        return True
    return isinstance(e, RemoteError) and (e.status == 404 or "cannotDownloadAbusiveFile" in e.reasons)


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
        replace_atomic(src / rel, target)
    shutil.rmtree(src, ignore_errors=True)


def fetch_cache(backend: Backend, manifest: dict, cache_dir: Path) -> tuple[int, set[str]]:
    """Download the manifest's cache shards missing from cache_dir, each verified by sha256; a corrupt or
    missing remote shard is skipped (the runner recomputes it). Return (count fetched, sha256 of those skipped)."""
    fetched, bad = 0, set()
    for rel, sha in sorted(manifest.get("cache", {}).items()):
        target = cache_dir / check_relpath(rel)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.download")
        try:
            try:
                backend.get(cache_name(sha), tmp)
            except NotFound:
                backend.get(legacy_cache_name(sha), tmp)
            if file_digest(tmp) != sha:
                raise IntegrityError(f"{cache_name(sha)} has the wrong sha256")
        except SyncError as e:
            tmp.unlink(missing_ok=True)
            if not unusable(e):
                raise
            log.warning("cache shard %s skipped (%s): it will be recomputed and uploaded again", rel,
                        str(e))
            bad.add(sha)
            continue
        replace_atomic(tmp, target)
        fetched += 1
    return fetched, bad


def restore_latest(backend: Backend, run_dir: Path, cache_dir: Path | None, work_dir: Path,
                   run_id: str | None = None, on_bad_cache: Callable[[set[str]], None] | None = None) -> int | None:
    """Restore the newest snapshot that verifies into run_dir and its cache into cache_dir (None: leave the
    cache on the remote); return its step. With run_id, a remote that holds another run is refused;
    on_bad_cache gets the sha256 of cache shards whose remote copy was corrupt or missing."""
    candidates = restore_candidates(backend, run_id)
    for snap in candidates:
        try:
            extracted, manifest = fetch_snapshot(backend, snap, work_dir)
        except SyncError as e:
            if not unusable(e):
                raise
            log.warning("snapshot %s skipped: %s", snap.name, str(e))
            continue
        move_into_place(extracted, manifest, run_dir)
        if cache_dir is None:
            log.info("restored step %d from %s", snap.step, snap.name)
            return int(manifest["step"])
        try:
            n, bad = fetch_cache(backend, manifest, cache_dir)
            log.info("restored step %d from %s (%d cache files downloaded%s)", snap.step, snap.name, n,
                     f", {len(bad)} corrupt or missing ones skipped" if bad else "")
            if bad and on_bad_cache is not None:
                on_bad_cache(bad)
        except SyncError as e:
            log.warning("restored step %d but not all of its cache: %s", snap.step, str(e))
        return int(manifest["step"])
    if candidates:
        raise IntegrityError(f"none of the {len(candidates)} snapshots on the remote passed verification; "
                             f"nothing was restored (see the warnings above).")
    return None
