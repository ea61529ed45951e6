"""--supervise N: restarts after abnormal deaths, never after errors a restart cannot fix."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.helpers import (CLOTHING, OutputWatcher, local_mobilenet_args, run_resume, sigterm_after_start,
                           start_resume, summary)

pytestmark = pytest.mark.slow


def child_pid(parent: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise AssertionError("the supervisor started no child")


def test_a_killed_child_is_restarted_from_its_checkpoint(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    run_dir = tmp_path / "run"
    process = start_resume(*local_mobilenet_args(run_dir, cache_dir, "train.steps=8000", "head.hidden_units=256",
                                                 "head.search=off", "checkpoint.every_steps=200"),
                           "--supervise", "2")
    watcher = OutputWatcher(process)
    assert watcher.wait_for("checkpoint saved at head step"), watcher.output()
    os.kill(child_pid(process.pid), signal.SIGKILL)
    assert process.wait(300) == 0
    output = watcher.output()
    assert "training killed by SIGKILL" in output and "restart 1/2" in output
    assert summary(run_dir)["global_step"] == 8000 and summary(run_dir)["resumed_from"]


def test_bad_data_is_not_retried(shared_assets, tmp_path):
    data = tmp_path / "data"
    for name, count in (("hat", 10), ("dress", 2)):
        (data / name).mkdir(parents=True)
        for src in sorted((CLOTHING / name).glob("*.jpg"))[:count]:
            shutil.copy(src, data / name / src.name)
    result = run_resume(*local_mobilenet_args(tmp_path / "run", None, data_dir=data), "--supervise", "3")
    assert result.returncode == 2
    assert "'dress' has 2" in result.stdout and "restart" not in result.stdout


def test_sigterm_to_the_supervisor_stops_the_child_gracefully(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    run_dir = tmp_path / "run"
    args = local_mobilenet_args(run_dir, cache_dir, "train.steps=1000000", "checkpoint.every_steps=0",
                                "checkpoint.every_seconds=3600", "head.search=off") + ["--supervise", "3"]
    code, output = sigterm_after_start(args, "training head: 1/")  # once the child has taken a step
    assert code == 130
    assert "stopped by SIGTERM at step" in output and "supervisor: stopped on SIGTERM" in output
    assert "restart" not in output
    assert list((run_dir / "checkpoints").glob("ckpt-*.json"))
