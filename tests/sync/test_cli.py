"""python -m sync list | pull | push | prune, run as a user would (folder backend; drive: see the kill test)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sync import SyncConfig, open_sync
from tests.sync.helpers import hand_over, tree, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sync", "--config", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def make_remote(tmp_path, steps_acc):
    remote = tmp_path / "remote"
    for step, acc in steps_acc:
        sync = open_sync(SyncConfig(folder=str(remote), keep=10), tmp_path / "run", tmp_path / "cache", "r1")
        sync.on_checkpoint(hand_over(step, write_checkpoint(sync.run_dir, step), acc))
        sync.close(timeout=30)
    return remote


def config_file(tmp_path, remote, run_dir, keep=3):
    path = tmp_path / "run.toml"
    path.write_text(f'[run]\ndir = "{run_dir}"\n[sync]\nbackend = "folder"\nfolder = "{remote}"\nkeep = {keep}\n')
    return path


def test_list_shows_step_val_accuracy_size_and_age(tmp_path):
    remote = make_remote(tmp_path, [(100, 0.5), (200, 0.75)])
    out = run_cli(config_file(tmp_path, remote, tmp_path / "run"), "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["step", "val_acc", "size", "age", "name"]
    assert lines[1].split()[:2] == ["200", "0.7500"] and "(latest, best)" in lines[1]
    assert lines[2].split()[:2] == ["100", "0.5000"]
    assert "MB" in lines[1] and " s " in lines[1]


def test_pull_restores_the_newest_or_a_chosen_step_into_the_run_dir(tmp_path):
    remote = make_remote(tmp_path, [(100, 0.5), (200, 0.75)])
    out = run_cli(config_file(tmp_path, remote, tmp_path / "new"), "pull", "--step", "100")
    assert out.returncode == 0, out.stderr
    assert "step 100" in out.stdout and (tmp_path / "new/checkpoints/ckpt-100.index").exists()
    assert not (tmp_path / "new/checkpoints/ckpt-200.index").exists()
    out = run_cli(config_file(tmp_path, remote, tmp_path / "new2"), "pull")
    assert (tmp_path / "new2/checkpoints/ckpt-200.index").exists()


def test_push_sends_the_last_checkpoint_handed_to_sync(tmp_path):
    run_dir = tmp_path / "run"
    off = open_sync(SyncConfig(), run_dir, tmp_path / "cache", "r1")  # trained with sync off: sync still records
    off.on_checkpoint(hand_over(100, write_checkpoint(run_dir, 100)))
    files = write_checkpoint(run_dir, 300)
    off.on_checkpoint(hand_over(300, files))
    remote = tmp_path / "remote"
    out = run_cli(config_file(tmp_path, remote, run_dir), "push")
    assert out.returncode == 0, out.stderr
    assert "snapshot step 300 uploaded and verified" in out.stdout
    assert open_sync(SyncConfig(folder=str(remote)), tmp_path / "vm2", tmp_path / "c2", "run").restore_latest() == 300
    assert set(tree(tmp_path / "vm2")) == set(files)
    again = run_cli(config_file(tmp_path, remote, run_dir), "push")
    assert "already in" in again.stdout


def test_prune_keeps_newest_k_and_best(tmp_path):
    remote = make_remote(tmp_path, [(100, 0.9), (200, 0.1), (300, 0.2), (400, 0.3)])
    out = run_cli(config_file(tmp_path, remote, tmp_path / "run", keep=2), "prune")
    assert out.returncode == 0, out.stderr
    assert "deleted 1 snapshot" in out.stdout and "snapshot-000000200-r1" in out.stdout
    assert sorted(p.name[:18] for p in remote.glob("snapshot-*")) == [
        "snapshot-000000100", "snapshot-000000300", "snapshot-000000400"]


def test_bad_setting_is_one_clear_line_without_traceback(tmp_path):
    out = run_cli(config_file(tmp_path, tmp_path / "r", tmp_path / "run"), "--set", "sync.backend=dropbox", "list")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: setting sync.backend = 'dropbox' is not allowed; use one of: folder, drive."


def test_sync_never_imports_tensorflow_or_the_runner():
    code = ("import sys, sync, sync.__main__, sync.backends.drive, sync.uploader, sync.restore; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'runner')]; assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_list_on_an_empty_remote_exits_66_with_the_folder_and_the_fix(tmp_path, capsys):
    from common.errors import EXIT_NO_INPUT
    from sync.__main__ import main
    remote = tmp_path / "empty"
    remote.mkdir()
    assert main(["--config", str(config_file(tmp_path, remote, tmp_path / "run")), "list"]) == EXIT_NO_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"error: sync: no snapshots in folder {remote}") and "sync.folder" in err
