"""Issue 3's acceptance test: train with the drive backend, lose the VM's disk, run the same command, continue."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import CLOTHING, MOBILENET_WEIGHTS, REPO, child_env, local_mobilenet_args, run_resume, summary

pytestmark = pytest.mark.slow


def test_new_vm_continues_from_the_newest_drive_snapshot_with_the_cache_restored(
        drive_config, fake_drive, tmp_path):
    assert CLOTHING.exists() and MOBILENET_WEIGHTS.exists(), "../shared test assets are missing"
    run_dir = tmp_path / "vm" / "run"  # the cache defaults to RUN_DIR/cache, so it goes with the disk too
    sync_settings = [f"sync.{k}={getattr(drive_config, k)}" for k in
                     ("backend", "folder", "credentials", "api_endpoint", "ca_certs", "chunk_mib")]
    command = local_mobilenet_args(run_dir, None, *sync_settings, "checkpoint.every_steps=100")

    first = run_resume(*command, "--set", "train.steps=300")
    assert first.returncode == 0, first.stdout
    assert "sync: snapshot step 300 uploaded and verified" in first.stdout
    shutil.rmtree(tmp_path / "vm")  # a brand-new VM: nothing local survives

    second = run_resume(*command, "--set", "train.steps=400", "--set", "export.enabled=true")
    assert second.returncode == 0, second.stdout
    assert "resumed from step 300" in second.stdout
    assert " 0 vectors computed now" in second.stdout  # the cache came from Drive: no bottleneck extraction
    assert "sync: snapshot step 400 uploaded and verified" in second.stdout
    assert summary(run_dir)["global_step"] == 400
    summary_classes = summary(run_dir)["classes"]
    assert len(fake_drive.live_files("snapshot-000000400-run.tar.gz")) == 1

    # Another machine classifies a photo with the export from the final snapshot, straight from Drive.
    shutil.rmtree(run_dir)
    photo = sorted((CLOTHING / "shoes").glob("*.jpg"))[0]
    classify = subprocess.run(
        [sys.executable, "-m", "runner.classify", f"drive:{drive_config.folder}", str(photo), "--json",
         *[arg for s in sync_settings if s.split("=")[0] != "sync.backend" for arg in ("--set", s)]],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert classify.returncode == 0, classify.stdout + classify.stderr
    [result] = json.loads(classify.stdout)
    assert result["path"].endswith(photo.name) and len(result["predictions"]) == 5
    assert {p["class"] for p in result["predictions"]} <= set(summary_classes)
