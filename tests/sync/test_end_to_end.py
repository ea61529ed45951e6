"""Issue 3's acceptance test: train with the drive backend, lose the VM's disk, run the same command, continue."""
from __future__ import annotations

import shutil

from tests.helpers import CLOTHING, MOBILENET_WEIGHTS, local_mobilenet_args, run_resume, summary


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

    second = run_resume(*command, "--set", "train.steps=400")
    assert second.returncode == 0, second.stdout
    assert "resumed from step 300" in second.stdout
    assert " 0 vectors computed now" in second.stdout  # the cache came from Drive: no bottleneck extraction
    assert "sync: snapshot step 400 uploaded and verified" in second.stdout
    assert summary(run_dir)["global_step"] == 400
    assert len(fake_drive.live_files("snapshot-000000400-run.tar.gz")) == 1
