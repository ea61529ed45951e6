"""The folder backend's faults."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sync import SyncConfig, SyncError, open_sync
from sync.backends import folder as folder_module
from sync.backends.folder import CATALOG, FolderBackend
from sync.remote import cache_name, list_snapshots
from tests.sync.helpers import hand_over, tree, write_cache, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _open(tmp_path, remote, run="run", cache="cache", run_id="r1", keep=3):
    return open_sync(SyncConfig(folder=str(remote), keep=keep), tmp_path / run, tmp_path / cache, run_id)


def _checkpoint(sync, step, cache_files=(), acc=0.5):
    sync.on_checkpoint(hand_over(step, write_checkpoint(sync.run_dir, step), acc, cache_files))


def test_a_full_sync_folder_is_one_line_per_attempt_with_the_reason(tmp_path, monkeypatch, caplog):
    real_copy = shutil.copyfile

    def full(src, dst, **kw):  # the sync folder's disk is full; the run dir's is not
        if str(dst).startswith(str(tmp_path / "remote")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, **kw)
    monkeypatch.setattr(shutil, "copyfile", full)
    sync = _open(tmp_path, tmp_path / "remote")
    _checkpoint(sync, 100)
    outcome = sync.close(timeout=30).message
    assert "still pending" in outcome and "no space left there" in outcome
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert 1 <= len(errors) <= 2 and all("no space left" in r.getMessage() for r in errors)
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert not list((tmp_path / "remote").glob(".*partial"))


def test_one_corrupt_cache_file_on_the_remote_is_skipped_the_rest_restored_and_it_is_uploaded_again(tmp_path):
    remote = tmp_path / "remote"
    sync = _open(tmp_path, remote)
    shards = write_cache(tmp_path / "cache", [f"s{i}.npy" for i in range(4)])
    _checkpoint(sync, 100, shards)
    assert "uploaded" in sync.close(timeout=30).message
    from sync.snapshot import file_digest
    bad_sha = file_digest(tmp_path / "cache" / shards[1])
    (remote / cache_name(bad_sha)).write_bytes(b"garbage")

    vm2 = _open(tmp_path, remote, run="vm2/run", cache="vm2/cache")
    assert vm2.restore_latest() == 100
    restored = tree(tmp_path / "vm2/cache")
    assert len(restored) == 3 and shards[1] not in restored  # the others came back
    shutil.copy(tmp_path / "cache" / shards[1], tmp_path / "vm2/cache" / shards[1])  # the runner recomputes it
    _checkpoint(vm2, 200, shards)
    assert "step 200 uploaded" in vm2.close(timeout=30).message
    assert file_digest(remote / cache_name(bad_sha)) == bad_sha  # replaced by a good copy


def test_sync_folder_pointing_at_a_file_names_the_setting(tmp_path):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with pytest.raises(SyncError, match=r"setting sync.folder = .*not-a-dir' is a file, not a directory"):
        _open(tmp_path, a_file)
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\ndir = "{tmp_path / "run"}"\n[sync]\nfolder = "{a_file}"\n')
    out = subprocess.run([sys.executable, "-m", "sync", "--config", str(config), "list"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "sync.folder" in out.stderr and "Traceback" not in out.stderr


def test_a_second_run_in_the_same_sync_folder_is_refused(tmp_path):
    remote = tmp_path / "remote"
    first = _open(tmp_path, remote, run="a", run_id="flowers")
    _checkpoint(first, 100)
    assert "uploaded" in first.close(timeout=30).message
    second = _open(tmp_path, remote, run="b", run_id="daisies")
    _checkpoint(second, 900)
    outcome = second.close(timeout=30).message
    assert "another run ('flowers', newest step 100)" in outcome and "its own sync.folder" in outcome
    assert [s.step for s in list_snapshots(FolderBackend(remote))] == [100]


def test_a_new_run_does_not_restore_another_runs_snapshot_from_its_sync_folder(tmp_path):
    remote = tmp_path / "remote"
    first = _open(tmp_path, remote, run="a", run_id="flowers")
    _checkpoint(first, 100)
    first.close(timeout=30)
    other = _open(tmp_path, remote, run="b/daisies", run_id="daisies")
    with pytest.raises(SyncError, match=r"another run \('flowers'.*its own sync.folder.*name the run dir 'flowers'"):
        other.restore_latest()
    other.close(timeout=1)
    same_run_new_vm = _open(tmp_path, remote, run="vm2/flowers", run_id="flowers")
    assert same_run_new_vm.restore_latest() == 100
    same_run_new_vm.close(timeout=5)


def test_properties_live_in_one_catalog_and_listing_reads_only_it(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    sync = _open(tmp_path, remote)
    shards = write_cache(tmp_path / "cache", [f"s{i}.npy" for i in range(20)])
    _checkpoint(sync, 100, shards, acc=0.75)
    sync.close(timeout=30)
    assert not (remote / ".props").exists()
    opened = []
    real_open = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: opened.append(self.name) or real_open(self, *a, **k))
    [snap] = list_snapshots(FolderBackend(remote))
    assert snap.val_accuracy == 0.75 and len(snap.sha256) == 64
    assert len(FolderBackend(remote).list("cache")) == 20
    assert opened == [CATALOG, CATALOG]  # one small file per listing, not one sidecar per file


def test_on_a_mounted_drive_the_outcome_says_what_verified_means_and_deletes_free_the_quota(tmp_path, monkeypatch):
    mount = tmp_path / "content/drive"
    monkeypatch.setattr(folder_module, "MOUNTED_DRIVE", mount)
    remote = mount / "MyDrive/runs/x"
    for step in (100, 200):
        sync = _open(tmp_path, remote, keep=1)
        _checkpoint(sync, step, acc=step / 1000)
        outcome = sync.close(timeout=30).message
    assert "uploaded and verified" in outcome and "DriveFS's local copy" in outcome
    truncated = []
    real_truncate = folder_module.os.truncate
    monkeypatch.setattr(folder_module.os, "truncate", lambda p, n: truncated.append(Path(p).name) or real_truncate(p, n))
    FolderBackend(remote).delete("snapshot-000000200-r1.tar.gz")
    assert truncated == ["snapshot-000000200-r1.tar.gz"]
    assert list_snapshots(FolderBackend(remote)) == []
