"""Ctrl-C / SIGTERM in the long phases before training: honoured at once, what is done kept (exit 130)."""
from __future__ import annotations

import json
import signal
import time

import pytest

from sync import open_sync
from tests.chaos.conftest import small_args
from tests.helpers import OutputWatcher, start_resume
from tests.sync.helpers import hand_over, write_checkpoint

pytestmark = pytest.mark.slow


def _stop(process, watcher, timeout: float = 30) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout)
    except Exception:
        process.kill()
        process.wait()
        raise AssertionError(f"SIGTERM not honoured within {timeout} s:\n{watcher.output()}") from None
    return code, watcher.output()


def test_sigterm_during_extraction_stops_it_and_keeps_the_shards_written(linked_clothing, tmp_path):
    cache = tmp_path / "cache"
    process = start_resume(*small_args(tmp_path / "run", cache, linked_clothing, "cache.shard_size=64",
                                       "cache.batch_size=16"))
    watcher = OutputWatcher(process)
    deadline = time.monotonic() + 300
    while not list(cache.glob("*/shard-*.npy")):  # observed progress: the first shard is on disk
        assert process.poll() is None and time.monotonic() < deadline, watcher.output()
        time.sleep(0.02)
    code, output = _stop(process, watcher)
    assert code == 130, output
    assert "stopped by SIGTERM during extraction" in output and "checkpoint saved" not in output
    rows = sum(len((p.with_suffix(".keys")).read_bytes()) // 64 for p in cache.glob("*/shard-*.npy"))
    assert 0 < rows < 1885


def test_sigterm_during_a_stalled_drive_restore_is_honoured_at_once(drive_config, fake_drive, small_data, tmp_path):
    source = tmp_path / "source"
    files = write_checkpoint(source, 10)
    sync = open_sync(drive_config, source, source / "cache", run_id="run")  # the run dir's name below
    sync.on_checkpoint(hand_over(10, files, 0.5))
    assert "uploaded" in sync.close(60).message
    fake_drive.inject("stall", on="media", seconds=90)
    settings = [f"sync.{k}={getattr(drive_config, k)}" for k in
                ("backend", "folder", "credentials", "api_endpoint", "ca_certs", "chunk_mib")] + ["sync.timeout_s=120"]
    process = start_resume(*small_args(tmp_path / "run", tmp_path / "cache", small_data, *settings))
    watcher = OutputWatcher(process)
    deadline = time.monotonic() + 120
    while not any(category == "media" for category, _, _ in list(fake_drive.log)):  # the download has begun
        assert process.poll() is None and time.monotonic() < deadline, watcher.output()
        time.sleep(0.02)
    code, output = _stop(process, watcher, timeout=20)
    assert code == 130, output
    assert "stopped by SIGTERM during the snapshot restore" in output
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing half-restored"
