"""A run directory that cannot be written is exit 2 naming run.dir, before anything else happens."""
from __future__ import annotations

import errno
import os

import pytest

import resume
from common.errors import EXIT_USER_ERROR
from runner import lock


def _main(run_dir, capsys) -> tuple[int, str]:
    code = resume.main(["--set", f"run.dir={run_dir}", "--set", "data.dir=/nonexistent-data"])
    return code, capsys.readouterr().err


def test_a_run_dir_under_a_regular_file_is_exit_2_naming_run_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, err = _main(tmp_path / "file" / "run", capsys)
    assert code == EXIT_USER_ERROR, err
    assert "run.dir" in err and str(tmp_path / "file" / "run") in err and "unexpected" not in err


def test_a_read_only_file_system_is_exit_2_naming_run_dir(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):  # what a read-only mount answers (root cannot be denied by chmod)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run" / ".write-test-x"))
    monkeypatch.setattr(lock.tempfile, "mkstemp", read_only)
    code, err = _main(tmp_path / "run", capsys)
    assert code == EXIT_USER_ERROR, err
    assert "run.dir" in err and "Read-only file system" in err and "--set run.dir=" in err
    assert not (tmp_path / "run" / lock.LOCK_FILE).exists()  # nothing was written before the check


@pytest.mark.skipif(os.geteuid() == 0, reason="root is not denied by chmod; the two tests above cover root")
def test_a_folder_without_write_permission_is_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        code, err = _main(run_dir, capsys)
    finally:
        run_dir.chmod(0o755)
    assert code == EXIT_USER_ERROR and "Permission denied" in err and "run.dir" in err, err
