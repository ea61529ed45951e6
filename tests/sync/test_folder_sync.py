"""The folder backend end to end through the runner's seam: stage, upload, retain, point, restore."""
from __future__ import annotations

import json
import threading

import pytest

from sync import Sync, SyncConfig, SyncError, open_sync
from sync.backends.folder import FolderBackend
from sync.remote import POINTER, list_snapshots
from tests.sync.helpers import hand_over, tree, write_cache, write_checkpoint


def _open(tmp_path, remote, keep=3, run="run", cache="cache"):
    cfg = SyncConfig(backend="folder", folder=str(remote), keep=keep)
    return open_sync(cfg, tmp_path / run, tmp_path / cache, run_id="r1")


def _checkpoint(sync, step, acc=0.5, cache_files=()):
    files = write_checkpoint(sync.run_dir, step)
    sync.on_checkpoint(hand_over(step, files, acc, cache_files))
    return files


def test_sync_off_is_a_no_op(tmp_path):
    sync = open_sync(SyncConfig(), tmp_path / "run", tmp_path / "cache", "r1")
    assert not sync.enabled
    sync.on_checkpoint(hand_over(1, []))
    assert sync.restore_latest() is None
    assert "off" in sync.close().message
    assert not (tmp_path / "run").exists()


def test_snapshot_round_trip_restores_run_and_cache_into_an_empty_run_dir(tmp_path):
    remote = tmp_path / "remote"
    sync = _open(tmp_path, remote)
    shards = write_cache(tmp_path / "cache", ["shard-0.npy", "shard-1.npy"])
    files = _checkpoint(sync, 200, cache_files=shards)
    expected = {f: (sync.run_dir / f).read_bytes() for f in files}
    expected_cache = tree(tmp_path / "cache")
    assert sync.close(timeout=30).message == f"sync: snapshot step 200 uploaded and verified (folder {remote})"

    fresh = _open(tmp_path, remote, run="vm2/run", cache="vm2/cache")
    assert fresh.restore_latest() == 200
    assert tree(tmp_path / "vm2/run") == expected
    assert tree(tmp_path / "vm2/cache") == expected_cache
    fresh.close(timeout=5)


def test_restore_from_an_empty_remote_returns_none(tmp_path):
    sync = _open(tmp_path, tmp_path / "remote")
    assert sync.restore_latest() is None
    sync.close(timeout=5)


def test_files_changed_after_on_checkpoint_do_not_change_the_snapshot(tmp_path):
    remote = tmp_path / "remote"
    gate = threading.Event()
    sync = Sync(SyncConfig(folder=str(remote)), tmp_path / "run", tmp_path / "cache", "r1",
                backend=_GatedFolder(remote, gate))
    files = _checkpoint(sync, 100)
    staged_metrics = (sync.run_dir / "metrics.jsonl").read_bytes()
    with open(sync.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 101}\n')  # the runner keeps appending
    (sync.run_dir / files[1]).unlink()  # and deletes old checkpoints
    gate.set()
    assert "step 100 uploaded" in sync.close(timeout=30).message
    fresh = _open(tmp_path, remote, run="vm2")
    assert fresh.restore_latest() == 100
    assert (tmp_path / "vm2" / "metrics.jsonl").read_bytes() == staged_metrics
    assert (tmp_path / "vm2" / files[1]).exists()


class _GatedFolder(FolderBackend):
    """A folder backend whose uploads wait for a gate: a network slower than checkpoints."""

    def __init__(self, root, gate):
        super().__init__(root)
        self.gate, self.puts = gate, []

    def put(self, name, local, properties):
        self.gate.wait(30)
        self.puts.append(name)
        return super().put(name, local, properties)


def test_checkpoints_faster_than_the_network_are_coalesced_to_the_newest(tmp_path):
    remote = tmp_path / "remote"
    gate = threading.Event()
    backend = _GatedFolder(remote, gate)
    sync = Sync(SyncConfig(folder=str(remote)), tmp_path / "run", tmp_path / "cache", "r1", backend=backend)
    for step in (100, 200, 300, 400):
        _checkpoint(sync, step)
    gate.set()
    assert "step 400 uploaded" in sync.close(timeout=30).message
    sent = [n for n in backend.puts if n.startswith("snapshot-")]
    assert sent[-1] == "snapshot-000000400-r1.tar.gz"
    assert len(sent) <= 2  # at most the one already in flight, then the newest
    assert [s.step for s in list_snapshots(backend)][0] == 400


class _FullFolder(FolderBackend):
    """A folder whose disk is full: every write fails."""

    def put(self, name, local, properties):
        raise SyncError(f"cannot write {name} to {self.root}: no space left there")


def test_snapshots_queued_by_a_failed_run_are_sent_by_the_next_one_newest_only(tmp_path):
    blocked = tmp_path / "full"
    sync = Sync(SyncConfig(folder=str(blocked)), tmp_path / "run", tmp_path / "cache", "r1",
                backend=_FullFolder(blocked))
    for step in (100, 200, 300):
        _checkpoint(sync, step)
    outcome = sync.close(timeout=30).message
    assert outcome.startswith("sync: 1 snapshot(s) still pending (newest step 300")  # the older two: superseded
    assert [s.step for s in sync.staging.pending()] == [300]
    assert "will be sent on the next run" in outcome

    remote = tmp_path / "remote"
    again = _open(tmp_path, remote)
    assert again.close(timeout=30).message == f"sync: snapshot step 300 uploaded and verified (folder {remote})"
    assert [s.step for s in list_snapshots(FolderBackend(remote))] == [300]
    assert not list((tmp_path / "run" / ".sync" / "staged").glob("step-*"))


def test_retention_keeps_newest_k_and_the_best_and_deletes_only_after_a_newer_one_is_verified(tmp_path):
    remote = tmp_path / "remote"
    accs = {100: 0.2, 200: 0.9, 300: 0.3, 400: 0.4, 500: 0.5, 600: 0.6}
    for step, acc in accs.items():  # one close per checkpoint, so none is coalesced away
        sync = _open(tmp_path, remote, keep=2)
        _checkpoint(sync, step, acc)
        assert f"step {step} uploaded" in sync.close(timeout=30).message
    steps = sorted(s.step for s in list_snapshots(FolderBackend(remote)))
    assert steps == [200, 500, 600]  # newest 2 + best val accuracy (step 200)


def test_pointer_names_the_newest_verified_snapshot(tmp_path):
    remote = tmp_path / "remote"
    for step in (100, 200):
        sync = _open(tmp_path, remote)
        _checkpoint(sync, step)
        sync.close(timeout=30)
    pointer = json.loads((remote / POINTER).read_text())
    assert pointer["step"] == 200 and pointer["name"] == "snapshot-000000200-r1.tar.gz"
    assert len(pointer["sha256"]) == 64


def test_restore_uses_the_pointer_when_the_listing_lags(tmp_path):
    remote = tmp_path / "remote"
    sync = _open(tmp_path, remote)
    _checkpoint(sync, 100)
    sync.close(timeout=30)
    fresh = _open(tmp_path, remote, run="vm2")
    fresh.backend.list = lambda: []  # the listing does not show it (yet)
    assert fresh.restore_latest() == 100


def test_restore_falls_back_to_the_listing_without_a_pointer(tmp_path):
    remote = tmp_path / "remote"
    sync = _open(tmp_path, remote)
    _checkpoint(sync, 100)
    sync.close(timeout=30)
    (remote / POINTER).unlink()
    assert _open(tmp_path, remote, run="vm2").restore_latest() == 100


def test_a_corrupted_newest_snapshot_is_skipped_for_the_previous_good_one(tmp_path):
    remote = tmp_path / "remote"
    for step in (100, 200):
        sync = _open(tmp_path, remote)
        _checkpoint(sync, step)
        sync.close(timeout=30)
    newest = remote / "snapshot-000000200-r1.tar.gz"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert _open(tmp_path, remote, run="vm2").restore_latest() == 100


def test_bad_backend_setting_names_the_setting_and_the_choices():
    from sync import SyncError
    with pytest.raises(SyncError, match=r"sync.backend = 'dropbox'.*folder, drive"):
        SyncConfig(backend="dropbox").validate()
    with pytest.raises(SyncError, match="sync.chunk_mib"):
        SyncConfig(backend="drive", folder="x", chunk_mib=0.3).validate()
    with pytest.raises(SyncError, match="sync.folder"):
        SyncConfig(backend="drive").validate()


def test_close_returns_within_its_timeout_while_an_upload_hangs(tmp_path):
    import time
    gate = threading.Event()
    sync = Sync(SyncConfig(folder=str(tmp_path / "remote")), tmp_path / "run", tmp_path / "cache", "r1",
                backend=_GatedFolder(tmp_path / "remote", gate))
    _checkpoint(sync, 100)
    started = time.monotonic()
    outcome = sync.close(timeout=0.5).message
    assert time.monotonic() - started < 2
    assert outcome.startswith("sync: 1 snapshot(s) still pending (newest step 100; still uploading when the timeout")
    gate.set()


def test_on_checkpoint_with_a_missing_file_logs_and_returns(tmp_path, caplog):
    sync = _open(tmp_path, tmp_path / "remote")
    sync.on_checkpoint(hand_over(100, ["checkpoints/ckpt-100.index"], None))
    assert "could not stage checkpoint step 100" in caplog.text
    outcome = sync.close(timeout=10)
    assert not outcome.on_remote and outcome.pending == 0
    assert "could not stage checkpoint step 100" in outcome.last_error and outcome.last_error in outcome.message


def test_a_vanished_cache_file_does_not_block_the_snapshot(tmp_path):
    sync = _open(tmp_path, tmp_path / "remote")
    shards = write_cache(tmp_path / "cache", ["a.npy"])
    _checkpoint(sync, 100, cache_files=shards + ["mobilenet_v2/gone.npy"])
    assert "step 100 uploaded" in sync.close(timeout=30).message
    assert _open(tmp_path, tmp_path / "remote", run="vm2", cache="vm2cache").restore_latest() == 100
    assert tree(tmp_path / "vm2cache") == tree(tmp_path / "cache")


def test_a_malicious_snapshot_on_the_remote_is_refused_and_nothing_escapes(tmp_path):
    import io
    import tarfile
    from sync.remote import SnapshotInfo, write_pointer
    from sync.snapshot import MANIFEST, file_digest
    remote = tmp_path / "remote"
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for name, data in ((MANIFEST, json.dumps({"step": 9, "files": {"../../escaped.txt": {}}}).encode()),
                           ("../../escaped.txt", b"pwned")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("checkpoints/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    backend = FolderBackend(remote)
    snap = SnapshotInfo("snapshot-000000009-x.tar.gz", 9, 0.9, file_digest(evil), evil.stat().st_size, 1.0)
    backend.put(snap.name, evil, snap.properties())
    write_pointer(backend, snap, tmp_path / "work")
    from sync import SyncError
    with pytest.raises(SyncError, match="none of the 1 snapshots on the remote passed verification"):
        _open(tmp_path, remote, run="deep/a/run").restore_latest()
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("link"))


def test_the_same_step_staged_twice_sends_the_later_copy(tmp_path):
    remote = tmp_path / "remote"
    gate = threading.Event()
    sync = Sync(SyncConfig(folder=str(remote)), tmp_path / "run", tmp_path / "cache", "r1",
                backend=_GatedFolder(remote, gate))
    _checkpoint(sync, 100)
    _checkpoint(sync, 100)  # e.g. a periodic and a final checkpoint at the same step; metrics.jsonl grew
    final_metrics = (sync.run_dir / "metrics.jsonl").read_bytes()
    gate.set()
    assert "step 100 uploaded" in sync.close(timeout=30).message
    assert _open(tmp_path, remote, run="vm2").restore_latest() == 100
    assert (tmp_path / "vm2" / "metrics.jsonl").read_bytes() == final_metrics


def test_close_waits_for_an_upload_in_flight_then_reports_it_sent_and_pointed_to(tmp_path):
    remote = tmp_path / "remote"
    gate = threading.Event()
    sync = Sync(SyncConfig(folder=str(remote)), tmp_path / "run", tmp_path / "cache", "r1",
                backend=_GatedFolder(remote, gate))
    _checkpoint(sync, 100)
    threading.Timer(0.3, gate.set).start()  # the upload is held until close() is already waiting
    outcome = sync.close(timeout=30)
    assert outcome.on_remote and outcome.step == 100 and outcome.pending == 0 and outcome.last_error is None
    assert json.loads((remote / POINTER).read_text())["step"] == 100


def test_a_checkpoint_staged_by_an_earlier_version_is_still_sent(tmp_path):
    remote = tmp_path / "remote"
    run_dir = tmp_path / "run"
    files = write_checkpoint(run_dir, 100)
    legacy = run_dir / ".sync" / "staged" / "step-000000100-1"
    for rel in files:
        (legacy / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        (legacy / "files" / rel).write_bytes((run_dir / rel).read_bytes())
    (legacy / "staged.json").write_text(json.dumps({  # the untyped info dict staging used to write
        "step": 100, "files": files, "run_id": "r1", "created": 1.0, "staged": 1.0, "metrics": {"val_accuracy": 0.5},
        "val_accuracy": 0.5, "val_loss": None, "runner_version": "0.9", "cache_files": []}))
    assert "step 100 uploaded" in _open(tmp_path, remote).close(timeout=30).message
    assert [s.step for s in list_snapshots(FolderBackend(remote))] == [100]
