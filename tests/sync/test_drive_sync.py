"""Sync through the runner's seam with the Drive backend: uploads off the training thread, restore on a new VM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sync import open_sync
from sync.remote import POINTER
from tests.sync.helpers import TRIES, hand_over, tree, write_cache, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _checkpoint(sync, step, acc=0.5, cache_files=(), size=4096):
    files = write_checkpoint(sync.run_dir, step, size=size)
    sync.on_checkpoint(hand_over(step, files, acc, cache_files))
    return files


def test_snapshot_and_cache_go_to_drive_and_restore_into_a_new_vm(drive_config, fake_drive, tmp_path, caplog):
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    shards = write_cache(tmp_path / "cache", ["shard-0.npy", "shard-1.npy"], size=300_000)
    _checkpoint(sync, 100, cache_files=shards[:1])
    files = _checkpoint(sync, 200, cache_files=shards)
    expected = {f: (sync.run_dir / f).read_bytes() for f in files}
    expected_cache = tree(tmp_path / "cache")
    assert sync.close(timeout=60).message == "sync: snapshot step 200 uploaded and verified (Google Drive folder runs/flowers)"
    names = sorted(fake_drive.path_of(f) for f in fake_drive.live_files())
    assert "runs/flowers/latest.json" in names and "runs/flowers/snapshot-000000200-r1.tar.gz" in names
    assert sum(n.startswith("runs/flowers/cache/cache-") for n in names) == 2  # each shard once, in cache/

    vm2 = open_sync(drive_config, tmp_path / "vm2/run", tmp_path / "vm2/cache", "r1")
    assert vm2.restore_latest() == 200
    assert tree(tmp_path / "vm2/run") == expected
    assert tree(tmp_path / "vm2/cache") == expected_cache
    assert "(2 cache files downloaded)" in caplog.text
    assert "nothing new" in vm2.close(timeout=5).message


def test_restore_finds_a_new_snapshot_through_the_pointer_while_the_listing_lags(drive_config, fake_drive, tmp_path):
    for step in (100, 200):
        fake_drive.listing_lags = step == 200  # snapshot 200 is not in listings yet; latest.json already was
        sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
        _checkpoint(sync, step)
        assert f"step {step} uploaded" in sync.close(timeout=60).message
    assert [f["name"] for f in fake_drive.live_files() if f["id"] in fake_drive.unindexed] == [
        "snapshot-000000200-r1.tar.gz"]
    vm2 = open_sync(drive_config, tmp_path / "vm2", tmp_path / "vm2cache", "r1")
    assert vm2.restore_latest() == 200


def test_restore_falls_back_to_the_listing_when_the_pointer_is_gone(drive_config, fake_drive, tmp_path):
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    _checkpoint(sync, 100)
    sync.close(timeout=60)
    fake_drive.files[fake_drive.live_files(POINTER)[0]["id"]]["trashed"] = True
    vm2 = open_sync(drive_config, tmp_path / "vm2", tmp_path / "vm2cache", "r1")
    assert vm2.restore_latest() == 100


def test_network_failure_never_reaches_the_training_thread_and_the_snapshot_stays_queued(
        drive_config, fake_drive, tmp_path, caplog):
    for on in ("list", "generateIds", "start", "create", "chunk"):  # every Drive API call fails
        fake_drive.inject("503", on=on, times=10_000)
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    started = time.monotonic()
    _checkpoint(sync, 100)
    assert time.monotonic() - started < 1.0  # on_checkpoint only stages a copy
    outcome = sync.close(timeout=30).message
    assert outcome.startswith("sync: 1 snapshot(s) still pending (newest step 100;")
    assert f"failed after {TRIES} tries" in outcome and "will be sent on the next run" in outcome
    assert "the snapshot stays queued" in caplog.text

    fake_drive.faults.clear()
    again = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    assert again.close(timeout=60).message == ("sync: snapshot step 100 uploaded and verified "
                                       "(Google Drive folder runs/flowers)")
    assert len(fake_drive.live_files("snapshot-000000100-r1.tar.gz")) == 1


def test_quota_exceeded_is_reported_with_the_fix_and_training_continues(drive_config, fake_drive, tmp_path):
    fake_drive.inject("quota", on="create", times=10_000)  # the snapshot is small: one multipart create
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    _checkpoint(sync, 100)
    outcome = sync.close(timeout=30).message
    assert "still pending" in outcome and "prune" in outcome and "shared drive" in outcome


def test_retention_on_drive_keeps_newest_and_best(drive_config, fake_drive, tmp_path):
    drive_config.keep = 1
    for step, acc in ((100, 0.9), (200, 0.1), (300, 0.2)):
        sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
        _checkpoint(sync, step, acc)
        assert f"step {step} uploaded" in sync.close(timeout=60).message
    snaps = sorted(f["name"] for f in fake_drive.live_files() if f["name"].startswith("snapshot-"))
    assert snaps == ["snapshot-000000100-r1.tar.gz", "snapshot-000000300-r1.tar.gz"]
    pointer = json.loads(fake_drive.content[fake_drive.live_files(POINTER)[0]["id"]])
    assert pointer["step"] == 300


KILLED_CHILD = """
import sys, pathlib
from sync.config import load_toml
from sync import HandOver, open_sync
config, run_dir, cache_dir = load_toml(sys.argv[1])
sync = open_sync(config, run_dir, cache_dir, "r1")
files = [str(p.relative_to(run_dir)) for p in sorted((run_dir / "checkpoints").iterdir())]
sync.on_checkpoint(HandOver(step=300, files=tuple(files), immutable=frozenset(files), runner_version="test",
                            metrics={"val_accuracy": 0.7, "val_loss": 0.5}))
print(sync.close(timeout=120).message, flush=True)
"""


def test_upload_killed_mid_way_continues_the_same_session_after_restart(drive_config, fake_drive, tmp_path):
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "ckpt-300.data-00000-of-00001").write_bytes(os.urandom(12 * 256 * 1024))
    (ck / "ckpt-300.index").write_bytes(b"index")
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\ndir = "{run_dir}"\n[sync]\n' + "".join(
        f"{k} = {json.dumps(getattr(drive_config, k))}\n" for k in
        ("backend", "folder", "credentials", "api_endpoint", "ca_certs", "chunk_mib", "retries", "backoff_s",
         "timeout_s")))
    fake_drive.inject("stall", on="chunk", skip=4, times=100, seconds=60)  # from the 5th chunk on, replies hang
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(config)], env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    while fake_drive.chunk_bytes_received < 5 * 256 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert fake_drive.sessions_started == 1 and fake_drive.live_files() == []
    received_before = fake_drive.chunk_bytes_received
    fake_drive.faults.clear()  # the network is back

    done = subprocess.run([sys.executable, "-m", "sync", "--config", str(config), "push"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "snapshot step 300 uploaded and verified" in done.stdout
    assert fake_drive.sessions_started == 1  # the same upload session, continued
    snap = fake_drive.live_files("snapshot-000000300-r1.tar.gz")
    assert len(snap) == 1
    size = int(snap[0]["size"])
    resent = fake_drive.chunk_bytes_received - received_before
    assert resent <= size - 4 * 256 * 1024  # the acknowledged chunks were not sent again
    assert fake_drive.chunk_bytes_duplicated <= 256 * 1024

    restored = open_sync(drive_config, tmp_path / "vm2", tmp_path / "vm2cache", "r1")
    assert restored.restore_latest() == 300
    assert (tmp_path / "vm2/checkpoints/ckpt-300.data-00000-of-00001").read_bytes() == \
        (ck / "ckpt-300.data-00000-of-00001").read_bytes()


def test_credentials_and_tokens_appear_in_no_log_and_no_uploaded_file(drive_config, fake_drive, tmp_path, caplog):
    import logging
    caplog.set_level(logging.DEBUG)  # every logger, the Google client libraries included
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    _checkpoint(sync, 100)
    deadline = time.monotonic() + 30
    while not fake_drive.live_files(POINTER) and time.monotonic() < deadline:
        time.sleep(0.05)
    fake_drive.revoke_tokens()  # force a refresh mid-run
    _checkpoint(sync, 200)
    sync.close(timeout=60)
    issued = "fake-access-"
    secrets = ["r3fr3sh-t0ken", "s3cr3t-client", issued]
    for secret in secrets:
        assert secret not in caplog.text
        for data in fake_drive.content.values():
            assert secret.encode() not in data
    assert fake_drive.token_requests >= 2
    import tarfile
    snap = fake_drive.live_files("snapshot-000000200-r1.tar.gz")[0]
    archive = tmp_path / "s.tar.gz"
    archive.write_bytes(fake_drive.content[snap["id"]])
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert not any(".sync" in n or "credentials" in n for n in names)
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            assert not any(s.encode() in data for s in secrets)
