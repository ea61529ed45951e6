"""A run directory that cannot be written is exit 2 naming run.dir, before anything else happens."""
from __future__ import annotations

import errno
import os
import pathlib
import shutil
import tempfile

import pytest

import resume
from common.errors import EXIT_USER_ERROR
from runner.run import lock


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


def _check_as_unprivileged_user(run_dir) -> str:
    """lock.check_writable(run_dir)'s error message, checked by a user chmod can deny (a forked child as
    `nobody` when the tests run as root, as they do in CI containers)."""
    if os.geteuid() != 0:
        with pytest.raises(lock.RunDirNotWritable) as caught:
            lock.check_writable(run_dir)
        return str(caught.value)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, check, report the message through the pipe
        os.close(read)
        message = b"no error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            lock.check_writable(run_dir)
        except lock.RunDirNotWritable as e:
            message = str(e).encode()
        except BaseException as e:  # noqa: BLE001 - anything else is the test's failure, reported as text
            message = f"unexpected {type(e).__name__}: {e}".encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_a_folder_without_write_permission_is_refused_naming_run_dir():
    base = pathlib.Path(tempfile.mkdtemp(prefix="run-dir-perm-"))
    try:
        base.chmod(0o755)  # reachable by the unprivileged user
        run_dir = base / "run"
        run_dir.mkdir()
        run_dir.chmod(0o555)
        message = _check_as_unprivileged_user(run_dir)
    finally:
        shutil.rmtree(base)
    assert "Permission denied" in message and "run.dir" in message and "--set run.dir=" in message, message
