"""Faults met by a whole run (real subprocesses): each ends in a correct run or a clear refusal (exit 2)."""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.conftest import copy_cache, small_args
from tests.helpers import (CLOTHING, OutputWatcher, REPO, assert_same_checkpoint, child_env, latest_checkpoint_prefix,
                           run_resume)

pytestmark = pytest.mark.slow
NATIVE_TF_LINES = ("oneDNN custom operations", "cudart_stub", "cuInit", "absl::InitializeLog")


def test_the_terminal_shows_no_tensorflow_start_up_lines(finished_run):
    output = finished_run[3]
    assert not [line for line in output.splitlines() if any(t in line for t in NATIVE_TF_LINES)], output


def test_a_second_trainer_on_the_same_run_dir_is_refused_naming_the_holder(small_data, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from runner.run.lock import hold_run_dir\n"
        f"with hold_run_dir({str(run_dir)!r}):\n    print('holding', flush=True); time.sleep(120)")],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert OutputWatcher(holder).wait_for("holding", 60)
        result = run_resume(*small_args(run_dir, tmp_path / "cache", small_data))
        assert result.returncode == 2, result.stdout
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}, started " in result.stdout
        assert not (run_dir / "metrics.jsonl").exists() and "Traceback" not in result.stdout
    finally:
        holder.kill()
        holder.wait()
    from runner.run.lock import LOCK_FILE
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)  # the OS released the killed holder's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_stale_temporaries_of_killed_writes_are_removed_at_start(finished_run, small_data, tmp_path):
    run_dir = shutil.copytree(finished_run[0], tmp_path / "run")
    leftovers = [run_dir / ".export-k1ll3d", run_dir / ".summary.json.abc123.tmp",
                 run_dir / "checkpoints" / ".ckpt-40.json.xyz.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "saved_model.pb").write_bytes(b"half")
    tensorflow_staging = run_dir / "checkpoints" / "ckpt-60_temp"  # tf.train.Checkpoint.write killed mid-way
    tensorflow_staging.mkdir()
    (tensorflow_staging / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"half")
    for path in leftovers[1:]:
        path.write_text("half")
    leftovers.append(tensorflow_staging)
    result = run_resume(*small_args(run_dir, finished_run[1], small_data, f"sync.folder={finished_run[2]}"))
    assert result.returncode == 0, result.stdout
    assert not [p for p in leftovers if p.exists()], result.stdout


def test_a_snapshot_of_an_incompatible_run_in_sync_folder_names_sync_folder_in_the_advice(finished_run, tmp_path):
    new_vm = tmp_path / "new-vm" / finished_run[0].name  # the same run dir name: sync restores its snapshot
    result = run_resume(*small_args(new_vm, tmp_path / "cache", _data_of(finished_run), "head.hidden_units=16",
                                    f"sync.folder={finished_run[2]}"))
    assert result.returncode == 2, result.stdout
    assert "hidden_units: 0 → 16" in result.stdout
    assert "another sync.folder" in result.stdout and str(finished_run[2]) in result.stdout


def _data_of(finished_run):
    from runner.run.config import load_config
    return Path(load_config(finished_run[0] / "config.toml").data.dir)


def test_bad_data_says_why_before_refusing_and_no_sync_line_comes_first(tmp_path):
    data = tmp_path / "data"
    photo = next((CLOTHING / "hat").glob("*.jpg"))
    (data / "common").mkdir(parents=True)
    for i in range(6):
        shutil.copy(photo, data / "common" / f"c{i}.jpg")
    (data / "rare").mkdir()
    (data / "rare" / "empty.jpg").write_bytes(b"")
    result = run_resume(*small_args(tmp_path / "run", None, data, "data.min_images_per_class=1"))
    assert result.returncode == 2, result.stdout
    assert "skipped rare/empty.jpg: empty file" in result.stdout
    assert "'rare' has 0" in result.stdout
    assert "sync: off" not in result.stdout and "Traceback" not in result.stdout


def test_a_cache_shard_with_flipped_bytes_is_re_extracted_and_the_run_ends_as_an_unbroken_one(finished_run, small_data,
                                                                                               tmp_path):
    unbroken, cache = finished_run[0], copy_cache(finished_run[1], tmp_path / "cache")
    shard = sorted(cache.glob("*/shard-*.npy"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 64])
    shard.write_bytes(bytes(raw))  # same size, same shape: only the content hash can tell
    run_dir = tmp_path / "run"
    result = run_resume(*small_args(run_dir, cache, small_data))
    assert result.returncode == 0, result.stdout
    assert f"cache shard {shard} is unreadable" in result.stdout
    assert "extracting bottlenecks for 8 images (28 already cached)" in result.stdout
    assert_same_checkpoint(latest_checkpoint_prefix(unbroken), latest_checkpoint_prefix(run_dir))
