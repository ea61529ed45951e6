"""The typed hand-over: sync owns and persists it, staging trusts its immutable flags, the CLI uses it."""
from __future__ import annotations

import threading

import pytest

from common.errors import EXIT_NO_INPUT
from sync import HandOver, SyncConfig, open_sync
from sync.__main__ import main as sync_cli
from tests.sync.helpers import hand_over, write_checkpoint


def test_a_hand_over_needs_a_runner_version_and_only_hands_over_files_it_lists():
    with pytest.raises(ValueError, match="runner_version"):
        HandOver(step=1, files=("a",), immutable=frozenset(), runner_version="")
    with pytest.raises(ValueError, match="immutable names files not handed over"):
        HandOver(step=1, files=("a",), immutable=frozenset({"b"}), runner_version="1")
    with pytest.raises(Exception, match="unsafe path"):
        HandOver(step=1, files=("../escape",), immutable=frozenset(), runner_version="1")


def test_a_hand_over_round_trips_through_its_json_record():
    original = HandOver(step=7, files=("b", "a"), immutable=frozenset({"a"}), runner_version="1.2",
                        metrics={"val_accuracy": 0.5, "val_loss": float("nan")}, cache_files=("x/s.npy",), final=True)
    again = HandOver.from_json(original.to_json())
    assert again == original and again.files == ("a", "b") and again.metrics["val_loss"] is None


def test_immutable_files_are_hard_linked_and_the_others_copied_when_staged(tmp_path):
    sync = open_sync(SyncConfig(folder=str(tmp_path / "remote")), tmp_path / "run", tmp_path / "cache", "r1",
                     start_uploader=False)  # nothing is sent, so the staged copy stays to be looked at
    files = write_checkpoint(sync.run_dir, 100)
    sync.staging.stage(sync.run_dir, hand_over(100, files), "r1", created=1.0)
    [staged] = sync.staging.pending()
    for rel in files:
        same_inode = (staged.path / "files" / rel).stat().st_ino == (sync.run_dir / rel).stat().st_ino
        assert same_inode == (rel != "metrics.jsonl"), rel


def test_sync_records_the_hand_over_itself_even_when_off(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sync = open_sync(SyncConfig(), run_dir, tmp_path / "cache", "r1")
    assert sync.last_hand_over() is None
    given = hand_over(200, write_checkpoint(run_dir, 200))
    sync.on_checkpoint(given)
    assert open_sync(SyncConfig(), run_dir, tmp_path / "cache", "r1").last_hand_over() == given
    assert not (run_dir / "last_snapshot.json").exists()


def test_list_does_not_start_the_background_uploader(tmp_path, capsys, monkeypatch):
    run_dir, remote = tmp_path / "run", tmp_path / "remote"
    staged = open_sync(SyncConfig(folder=str(tmp_path / "unreachable")), run_dir, tmp_path / "cache", "r1",
                       start_uploader=False)
    staged.staging.stage(run_dir, hand_over(100, write_checkpoint(run_dir, 100)), "r1", created=1.0)
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\ndir = "{run_dir}"\n[sync]\nfolder = "{remote}"\n')
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name))
    assert sync_cli(["--config", str(config), "list"]) == EXIT_NO_INPUT
    assert "no snapshots in folder" in capsys.readouterr().err
    assert started == [] and len(staged.staging.pending()) == 1, "list must not send what is staged"


def test_sync_settings_in_a_config_file_are_relative_to_that_file(tmp_path, monkeypatch):
    from sync.config import load_toml
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "run.toml"
    config.write_text('[run]\ndir = "../runs/a"\n[sync]\nfolder = "../remote"\n')
    monkeypatch.chdir("/")  # paths must not depend on where the command runs
    sync_config, run_dir, cache_dir = load_toml(config)
    assert run_dir == tmp_path / "runs" / "a" and cache_dir == run_dir / "cache"
    assert sync_config.folder == str(tmp_path / "remote")
