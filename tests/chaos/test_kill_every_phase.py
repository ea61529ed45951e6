"""SIGKILL in every phase (scan, extraction, checkpoint write, snapshot copy, head training, export, restore,
fine-tuning), then the same command: the run ends as an unbroken one would, bit for bit."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.chaos.conftest import small_args
from tests.helpers import (OutputWatcher, assert_same_checkpoint, latest_checkpoint_prefix, run_resume, start_resume,
                           summary)

pytestmark = pytest.mark.slow


def sigkill_when(args: list[str], ready: Callable[[OutputWatcher], bool], timeout: float = 300) -> str:
    """Start resume.py ARGS and SIGKILL it as soon as ready(watcher) holds; returns its output. Fails if it
    ended first (the phase was never observed)."""
    process = start_resume(*args)
    watcher = OutputWatcher(process)
    deadline = time.monotonic() + timeout
    while not ready(watcher):
        assert process.poll() is None and time.monotonic() < deadline, watcher.output()
        time.sleep(0.005)
    process.kill()
    process.wait()
    return watcher.output()


def printed(text: str) -> Callable[[OutputWatcher], bool]:
    return lambda watcher: any(text in line for line in watcher.lines)


def exists(root: Path, pattern: str) -> Callable[[OutputWatcher], bool]:
    return lambda watcher: bool(list(root.glob(pattern)))


def checkpoint_being_written(folder: Path) -> Callable[[OutputWatcher], bool]:
    """A checkpoint whose files are there but not its marker yet (the write takes milliseconds: if no poll
    sees one, the moment right after the first write, before the sync hand-over, is taken)."""
    return lambda watcher: any(not p.with_suffix(".json").exists() for p in folder.glob("ckpt-*.index")) \
        or bool(list(folder.glob("*_temp*"))) or printed("checkpoint saved at head step")(watcher)


def test_sigkill_in_every_phase_of_the_head_run_then_resume_ends_bit_identical(finished_run, small_data, tmp_path):
    run_dir, cache, folder = tmp_path / "run", tmp_path / "cache", tmp_path / "sync"
    args = small_args(run_dir, cache, small_data, f"sync.folder={folder}", export=True)
    sigkill_when(args, printed("checking "))                                       # the scan
    sigkill_when(args, exists(cache, "*/shard-*.npy"))                              # extraction
    sigkill_when(args, checkpoint_being_written(run_dir / "checkpoints"))           # a checkpoint write
    sigkill_when(args, printed("checkpoint saved at head step"))                   # the snapshot copy (sync)
    sigkill_when(args, printed("resumed from step"))                                # head training
    sigkill_when(args, exists(run_dir, ".export-*"))                                # the export
    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    unbroken = finished_run[0]
    assert_same_checkpoint(latest_checkpoint_prefix(unbroken), latest_checkpoint_prefix(run_dir))
    assert summary(run_dir)["test_accuracy"] == summary(unbroken)["test_accuracy"]
    assert (run_dir / "export" / "model.json").exists()

    new_vm = tmp_path / "new-vm" / "run"                 # the restore, on a new VM (same run dir name)
    args = small_args(new_vm, None, small_data, f"sync.folder={folder}")
    sigkill_when(args, exists(new_vm, ".sync/*"))
    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    assert_same_checkpoint(latest_checkpoint_prefix(unbroken), latest_checkpoint_prefix(new_vm))


def test_sigkill_during_fine_tuning_then_resume_finishes_it(finished_run, small_data, tmp_path):
    run_dir = shutil.copytree(finished_run[0], tmp_path / "run")
    args = small_args(run_dir, finished_run[1], small_data, "fine_tune.enabled=true", "fine_tune.steps=12",
                      "fine_tune.batch_size=4", "checkpoint.every_steps=4", "fine_tune.eval_every_steps=4")
    sigkill_when(args, printed("checkpoint saved at finetune step"))
    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    assert "resumed from fine-tuning step" in result.stdout
    assert summary(run_dir)["stage"] == "finetune" and summary(run_dir)["global_step"] == 52
