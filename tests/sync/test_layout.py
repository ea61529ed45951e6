"""The Drive layout: cache shards in cache/, the final export and report also as plain files."""
from __future__ import annotations

import shutil

from sync import SyncConfig, open_sync
from sync.remote import legacy_cache_name
from sync.snapshot import file_digest
from tests.sync.helpers import hand_over, tree, write_cache, write_checkpoint


def _final_checkpoint(sync, step, cache_files=()):
    files = write_checkpoint(sync.run_dir, step)
    extra = {"export/model.tflite": b"tflite", "export/labels.txt": b"a\nb\n",
             "export/saved_model/variables/variables.index": b"nested", "report/curves.png": b"png"}
    for rel, data in extra.items():
        (sync.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (sync.run_dir / rel).write_bytes(data)
    published = ["export/model.tflite", "export/labels.txt", "report/curves.png"]  # as RunDir.published names them
    sync.on_checkpoint(hand_over(step, files + sorted(extra), None, cache_files, final=True, published=published))
    return extra


def test_the_final_export_and_report_are_plain_files_next_to_the_snapshots_on_drive(drive_config, fake_drive,
                                                                                      tmp_path):
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    shards = write_cache(tmp_path / "cache", ["a.npy"])
    _final_checkpoint(sync, 300, shards)
    assert "step 300 uploaded" in sync.close(timeout=60).message
    paths = {fake_drive.path_of(f): fake_drive.content[f["id"]] for f in fake_drive.live_files()}
    assert paths["runs/flowers/export/model.tflite"] == b"tflite"
    assert paths["runs/flowers/export/labels.txt"] == b"a\nb\n"
    assert paths["runs/flowers/report/curves.png"] == b"png"
    assert not [p for p in paths if "saved_model" in p]  # nested folders stay inside the snapshot only
    sha = file_digest(tmp_path / "cache" / shards[0])
    assert f"runs/flowers/cache/cache-{sha}" in paths
    top = sorted(p.removeprefix("runs/flowers/") for p in paths if p.count("/") == 2)
    assert top == ["latest.json", "snapshot-000000300-r1.tar.gz"]


def test_a_failed_plain_copy_never_fails_the_snapshot(tmp_path, caplog):
    remote = tmp_path / "remote"
    (remote / "export").mkdir(parents=True)
    (remote / "export" / "model.tflite").mkdir()  # a folder where the copy should go: the copy fails
    sync = open_sync(SyncConfig(folder=str(remote)), tmp_path / "run", tmp_path / "cache", "r1")
    _final_checkpoint(sync, 100)
    assert "step 100 uploaded" in sync.close(timeout=30).message
    assert "plain copy of export/model.tflite failed" in caplog.text


def test_cache_shards_stored_flat_by_older_versions_are_still_restored_and_not_sent_again(tmp_path):
    remote = tmp_path / "remote"
    sync = open_sync(SyncConfig(folder=str(remote)), tmp_path / "run", tmp_path / "cache", "r1")
    shards = write_cache(tmp_path / "cache", ["a.npy"])
    sync.on_checkpoint(hand_over(100, write_checkpoint(sync.run_dir, 100), None, shards))
    sync.close(timeout=30)
    sha = file_digest(tmp_path / "cache" / shards[0])
    shutil.move(remote / "cache" / f"cache-{sha}", remote / legacy_cache_name(sha))  # the old layout
    vm2 = open_sync(SyncConfig(folder=str(remote)), tmp_path / "vm2/run", tmp_path / "vm2/cache", "r1")
    assert vm2.restore_latest() == 100
    assert tree(tmp_path / "vm2/cache") == tree(tmp_path / "cache")
    vm2.on_checkpoint(hand_over(200, write_checkpoint(vm2.run_dir, 200), None, shards))
    assert "step 200 uploaded" in vm2.close(timeout=30).message
    assert not (remote / "cache" / f"cache-{sha}").exists()  # known on the remote: not uploaded twice
