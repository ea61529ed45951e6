"""Remove what killed processes left half-written: `.export-*` staging folders, `.NAME.*.tmp` files and
TensorFlow's `PREFIX_temp/part-*` checkpoint staging folders."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from sync import STATE_DIR

log = logging.getLogger("runner")

SHARED_CACHE_STALE_S = 3600  # a cache outside the run dir may be shared: only old temp files there are stale


def _temporaries(root: Path):
    for path in root.rglob(".*"):
        if STATE_DIR in path.relative_to(root).parts:
            continue  # sync cleans its own queue
        if path.is_dir() and path.name.startswith(".export-") and path.parent == root:
            yield path
        elif path.is_file() and path.name.endswith(".tmp"):
            yield path


def _tensorflow_staging(root: Path):
    """The folders tf.train.Checkpoint.write fills (`PREFIX_temp/part-*`) before it merges them into PREFIX
    and deletes them: one that is still there was left by a killed write."""
    for path in root.rglob("*_temp"):
        if path.is_dir() and STATE_DIR not in path.relative_to(root).parts and \
                all(child.name.startswith("part-") for child in path.iterdir()):
            yield path


def remove_stale_temporaries(run_dir: Path, cache_dir: Path) -> int:
    """Delete leftovers of killed writes; call it holding the run-dir lock. Returns how many were removed."""
    run_dir, cache_dir = Path(run_dir).resolve(), Path(cache_dir).resolve()
    found = [(p, 0.0) for p in (*_temporaries(run_dir), *_tensorflow_staging(run_dir))]
    if cache_dir.is_dir() and not cache_dir.is_relative_to(run_dir):
        found += [(p, SHARED_CACHE_STALE_S) for p in _temporaries(cache_dir)]
    removed = 0
    for path, min_age in found:
        try:
            if time.time() - path.stat().st_mtime < min_age:
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted process", removed)
    return removed
