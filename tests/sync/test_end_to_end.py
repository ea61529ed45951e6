"""Issues 3 and 10's acceptance test: machine A (one OAuth client) trains with the drive backend and syncs; machine
B (another OAuth client, a fresh disk) lists the snapshots, resumes from A's newest one, and classifies from Drive."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import CLOTHING, MOBILENET_WEIGHTS, REPO, child_env, local_mobilenet_args, run_resume, summary

pytestmark = pytest.mark.slow


KEYS = ("backend", "folder", "credentials", "api_endpoint", "ca_certs", "chunk_mib")


def _sync_settings(config) -> list[str]:
    return [f"sync.{k}={getattr(config, k)}" for k in KEYS]


@pytest.mark.slow
def test_machine_b_with_other_credentials_lists_resumes_and_classifies_what_machine_a_synced(
        drive_config, other_machine_config, fake_drive, tmp_path):
    assert CLOTHING.exists() and MOBILENET_WEIGHTS.exists(), "../shared test assets are missing"
    run_a, run_b = tmp_path / "machine-a" / "run", tmp_path / "machine-b" / "run"  # cache: RUN_DIR/cache

    first = run_resume(*local_mobilenet_args(run_a, None, *_sync_settings(drive_config),
                                             "checkpoint.every_steps=100"), "--set", "train.steps=300")
    assert first.returncode == 0, first.stdout
    assert "sync: snapshot step 300 uploaded and verified" in first.stdout

    # Machine B: another app (OAuth client) on the same Drive account; nothing of machine A's disk.
    b_settings = _sync_settings(other_machine_config)
    config_b = tmp_path / "machine-b.toml"
    config_b.write_text(f'[run]\ndir = "{run_b}"\n[sync]\n' + "".join(
        f"{k} = {json.dumps(getattr(other_machine_config, k))}\n" for k in KEYS))
    listed = subprocess.run([sys.executable, "-m", "sync", "--config", str(config_b), "list"], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[1].split()[0] == "300" and "(latest" in rows[1] and "snapshot-000000300-run.tar.gz" in rows[1]

    second = run_resume(*local_mobilenet_args(run_b, None, *b_settings, "checkpoint.every_steps=100"),
                        "--set", "train.steps=400", "--set", "export.enabled=true")
    assert second.returncode == 0, second.stdout
    assert "resumed from step 300" in second.stdout
    assert " 0 vectors computed now" in second.stdout  # the cache came from Drive: no bottleneck extraction
    assert "sync: snapshot step 400 uploaded and verified" in second.stdout
    assert summary(run_b)["global_step"] == 400
    summary_classes = summary(run_b)["classes"]
    assert len(fake_drive.live_files("snapshot-000000400-run.tar.gz")) == 1

    photo = sorted((CLOTHING / "shoes").glob("*.jpg"))[0]
    classify = subprocess.run(
        [sys.executable, "-m", "runner.classify", f"drive:{other_machine_config.folder}", str(photo), "--json",
         *[arg for s in b_settings if s.split("=")[0] != "sync.backend" for arg in ("--set", s)]],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert classify.returncode == 0, classify.stdout + classify.stderr
    [result] = json.loads(classify.stdout)
    assert result["path"].endswith(photo.name) and len(result["predictions"]) == 5
    assert {p["class"] for p in result["predictions"]} <= set(summary_classes)
    clients = {g.client for g in fake_drive.tokens.values()}
    assert clients == {"cid.apps.googleusercontent.com", "machine-b.apps.googleusercontent.com"}
