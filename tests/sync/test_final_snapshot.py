"""A run whose final snapshot is not on the remote is not done. resume.py trains a tiny model in
process against the fake Drive; the Drive is full when the final snapshot is handed over: exit 75, the model's
local place and the exact push command; that push, once the Drive has room, exits 0 and a rerun is done (0)."""
from __future__ import annotations

import shlex

import pytest

import resume
from common.errors import EXIT_OK, EXIT_TRANSIENT
from runner.run.config import load_config
from runner.ui.notebook import run_status
from sync import Sync
from sync.__main__ import main as sync_cli
from sync.backends.folder import FolderBackend
from sync.outcome import OUTCOME_RECORD, SyncOutcome
from sync.remote import list_snapshots, read_pointer
from tests.helpers import write_synthetic_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny"), num_classes=2, per_class=12, size=40)


def _config(run_dir, data_dir, drive_config):
    sync = {"backend": "drive", "folder": drive_config.folder, "credentials": drive_config.credentials,
            "api_endpoint": drive_config.api_endpoint, "ca_certs": drive_config.ca_certs, "chunk_mib": 0.25,
            "retries": drive_config.retries, "backoff_s": drive_config.backoff_s,
            "timeout_s": drive_config.timeout_s, "flush_timeout_s": 60}
    return load_config(None, [f"data.dir={data_dir}", f"run.dir={run_dir}", "backbone.name=mobilenet",
                              "backbone.weights=none", "backbone.allow_random_weights=true", "backbone.alpha=0.25",
                              "backbone.image_size=32", "train.steps=20", "checkpoint.every_steps=10",
                              "checkpoint.every_seconds=0", "export.enabled=false", "train.progress=lines",
                              "data.min_images_per_class=2", "head.search=off",
                              *(f"sync.{k}={v}" for k, v in sync.items())])


def test_a_drive_full_at_the_final_snapshot_exits_75_naming_the_model_and_the_push_command(
        tiny_data, drive_config, fake_drive, tmp_path, monkeypatch, capsys):
    hand_overs = []
    on_checkpoint = Sync.on_checkpoint

    def drive_fills_up_at_the_final_snapshot(sync, hand_over):
        hand_overs.append(hand_over)
        if hand_over.final:
            for on in ("start", "create"):
                fake_drive.inject("quota", on=on, times=10_000)
        on_checkpoint(sync, hand_over)
    monkeypatch.setattr(Sync, "on_checkpoint", drive_fills_up_at_the_final_snapshot)
    config = _config(tmp_path / "run", tiny_data, drive_config)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # the trainer's SIGTERM handler stays out of pytest
    monkeypatch.setattr("runner.features.distribute.configure_tensorflow", lambda train: None)  # TF is set up already

    assert resume.train(config, debug=False) == EXIT_TRANSIENT
    out, err = capsys.readouterr()
    assert "done: step 20" in out
    push = f"python -m sync --config {shlex.quote(str(config.run_dir / 'config.toml'))} push"
    assert err.startswith("error: the final snapshot (step 20) is not in Google Drive folder runs/flowers")
    assert "no storage left" in err and f"on this machine only, in {config.run_dir}" in err and push in err
    assert [h.final for h in hand_overs] == [False, False, True]
    recorded = SyncOutcome.load(config.run_dir / ".sync" / OUTCOME_RECORD)
    assert recorded.final and not recorded.final_on_remote and recorded.pending == 1 and recorded.step == 20
    status = run_status(config.run_dir)[-1]  # what the notebook prints when the trainer exits 75
    assert status.startswith("WARNING: the final snapshot (step 20) is not in Google Drive") and push in status

    fake_drive.faults.clear()  # room again: the push command in the message sends the final snapshot
    assert sync_cli(shlex.split(push)[3:]) == EXIT_OK
    assert "snapshot step 20 uploaded and verified" in capsys.readouterr().out
    from sync.backends import make_backend
    backend = make_backend(drive_config, tmp_path / "transfers")
    assert read_pointer(backend).final and [s.step for s in list_snapshots(backend)][0] == 20

    monkeypatch.setattr(Sync, "on_checkpoint", on_checkpoint)
    assert resume.train(config, debug=False) == EXIT_OK  # already finished, and its final snapshot is on Drive
    out, err = capsys.readouterr()
    assert "already finished" in out and "sync: nothing new to upload" in out and not err
    assert run_status(config.run_dir)[-1] == "sync: the final snapshot (step 20) is in Google Drive folder runs/flowers"


class Killed(BaseException):
    """A kill: nothing after it in the job runs (sync's close in resume.train still flushes what was sent)."""


def _folder_run_config(run_dir, data_dir, folder):
    """A tiny run with export (SavedModel and labels) synced to a local folder."""
    return load_config(None, [f"data.dir={data_dir}", f"run.dir={run_dir}", "backbone.name=mobilenet",
                              "backbone.weights=none", "backbone.allow_random_weights=true", "backbone.alpha=0.25",
                              "backbone.image_size=32", "train.steps=20", "checkpoint.every_steps=10",
                              "checkpoint.every_seconds=0", "export.enabled=true",
                              "export.formats=saved_model,labels", "train.progress=lines",
                              "data.min_images_per_class=2", "head.search=off", f"sync.folder={folder}",
                              "sync.flush_timeout_s=60"])


def _final_snapshot_members(folder) -> set[str]:
    """The files inside the remote's pointed-to snapshot, which must be the run's final one."""
    import tarfile
    pointer = read_pointer(FolderBackend(folder))
    assert pointer is not None and pointer.final, "the remote's newest snapshot must be the final one"
    with tarfile.open(folder / pointer.name) as tar:
        return set(tar.getnames())


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr("signal.signal", lambda *args: None)  # the trainer's SIGTERM handler stays out of pytest
    monkeypatch.setattr("runner.features.distribute.configure_tensorflow", lambda train: None)


def test_a_kill_while_the_report_is_drawn_sends_the_final_snapshot_with_the_export_at_the_next_start(
        tiny_data, tmp_path, monkeypatch, capsys, in_process):
    import runner.job
    config = _folder_run_config(tmp_path / "run", tiny_data, tmp_path / "remote")
    draw = runner.job.write_report
    kills = []

    def killed_while_drawing(run_dir):
        kills.append(run_dir)
        assert (config.run_dir / "export" / "model.json").is_file(), "the kill comes after `exported step`"
        raise Killed
    monkeypatch.setattr(runner.job, "write_report", killed_while_drawing)
    with pytest.raises(Killed):
        resume.train(config, debug=False)
    assert len(kills) == 1
    assert not read_pointer(FolderBackend(tmp_path / "remote")).final, "the kill came before the final hand-over"
    capsys.readouterr()

    monkeypatch.setattr(runner.job, "write_report", draw)
    assert resume.train(config, debug=False) == EXIT_OK
    out, err = capsys.readouterr()
    assert "done: step 20" in out and "uploaded and verified" in out and not err
    members = _final_snapshot_members(tmp_path / "remote")
    assert {"summary.json", "export/model.json", "report/report.json"} <= members
    assert {"export/saved_model.pb", "export/labels.txt"} <= members

    assert resume.train(config, debug=False) == EXIT_OK  # and from now on it is simply finished
    assert "already finished, nothing changed" in capsys.readouterr().out


def test_a_kill_before_the_final_hand_over_is_mended_by_the_next_start_and_never_loops_on_75(
        tiny_data, tmp_path, monkeypatch, capsys, in_process):
    from runner.job import Job
    config = _folder_run_config(tmp_path / "run", tiny_data, tmp_path / "remote")
    hand_to_sync = Job._hand_to_sync
    kills = []

    def killed_at_the_final_hand_over(job, checkpoint, final=False):
        if final:
            kills.append(checkpoint.step)
            raise Killed
        hand_to_sync(job, checkpoint, final)
    monkeypatch.setattr(Job, "_hand_to_sync", killed_at_the_final_hand_over)
    with pytest.raises(Killed):
        resume.train(config, debug=False)
    assert kills == [20]
    capsys.readouterr()

    monkeypatch.setattr(Job, "_hand_to_sync", hand_to_sync)
    assert resume.train(config, debug=False) == EXIT_OK  # results, export and report are all there already
    out, err = capsys.readouterr()
    assert "already finished, nothing changed: step 20" in out and "uploaded and verified" in out and not err
    assert {"summary.json", "export/model.json", "report/report.json"} <= _final_snapshot_members(tmp_path / "remote")


def test_push_sends_the_final_snapshot_whose_content_the_remote_lacks_though_one_of_that_step_is_there(
        tmp_path, capsys):
    from sync import SyncConfig, open_sync
    from sync.handover import save_record
    from tests.sync.helpers import hand_over, tree, write_checkpoint
    run_dir, remote = tmp_path / "run", tmp_path / "remote"
    files = write_checkpoint(run_dir, 20) + ["summary.json"]
    (run_dir / "summary.json").write_text('{"global_step": 20}', encoding="utf-8")
    sync = open_sync(SyncConfig(folder=str(remote)), run_dir, tmp_path / "cache", "run")
    sync.on_checkpoint(hand_over(20, files, final=True))
    assert sync.close(30).final_on_remote
    # finished again at the same step, now with an export; a kill came after sync's record, before its staging
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model.json").write_text('{"step": 20}', encoding="utf-8")
    save_record(run_dir / ".sync" / "hand_over.json", hand_over(20, files + ["export/model.json"], final=True))
    config_file = tmp_path / "run.toml"
    config_file.write_text(f'[run]\ndir = "{run_dir}"\n[sync]\nfolder = "{remote}"\n', encoding="utf-8")

    assert sync_cli(["--config", str(config_file), "push"]) == EXIT_OK
    assert "snapshot step 20 uploaded and verified" in capsys.readouterr().out
    vm2 = open_sync(SyncConfig(folder=str(remote)), tmp_path / "vm2", tmp_path / "c2", "run")
    assert vm2.restore_latest() == 20 and "export/model.json" in tree(tmp_path / "vm2")
    assert sync_cli(["--config", str(config_file), "push"]) == EXIT_OK
    assert "is already in" in capsys.readouterr().out
