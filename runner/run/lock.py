"""One trainer per run directory: an exclusive flock on RUN_DIR/.lock, released by the OS when the holder dies."""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from runner.errors import RunnerError

LOCK_FILE = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # some network / FUSE file systems
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)

log = logging.getLogger("runner")


class RunDirBusy(RunnerError):
    """Another process holds the run directory's lock."""


def _holder(lock_path: Path) -> str:
    try:
        who = json.loads(lock_path.read_text(encoding="utf-8"))
        return f"pid {who['pid']} on host {who['host']}, started {who['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


class RunDirNotWritable(RunnerError):
    """run.dir cannot be created or written (read-only file system, permissions, a file in the way)."""


def check_writable(run_dir: Path) -> None:
    """Create run_dir if needed and write (then delete) one file in it; RunDirNotWritable naming run.dir."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno not in NOT_WRITABLE:
            raise
        why = "a file is in the way" if e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror
        raise RunDirNotWritable(
            f"run.dir {run_dir} cannot be written ({why}: {e.filename or run_dir}). A run writes its checkpoints "
            f"there: set run.dir (--set run.dir=...) to a folder you can write, e.g. on the VM's local disk, "
            f"or fix the folder's permissions.") from None


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock for the block; raise RunDirBusy naming the holder if taken."""
    run_dir = Path(run_dir)
    check_writable(run_dir)  # before anything else writes there: a clear exit 2, not a crash on .lock
    lock_path = run_dir / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(f"{run_dir} is in use by {_holder(lock_path)}. Only one trainer may use a run "
                             f"directory at a time: wait for it to finish (or stop it), or start this one "
                             f"with another run.dir (--set run.dir=...).") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            log.warning("the file system of %s does not support locks (%s): nothing stops a second trainer "
                        "from using this run directory at the same time", run_dir, e.strerror)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (so does the process dying)
