"""Crash-safe file writes (temp file in the same folder, fsync, rename) and file digests."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """Call write(fileobj) on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file; "disk full" messages must
        raise
    fsync_dir(path.parent)


def replace_atomic(src: Path, dst: Path) -> None:
    """Rename src (a complete file, fsynced first, or a folder) over dst, then fsync their folder: after a
    crash dst is the old or the new content, never a torn one. The one rename-into-place of the project."""
    try:
        if Path(src).is_file():
            with open(src, "rb") as f:
                os.fsync(f.fileno())
        os.replace(src, dst)
    except OSError as e:
        if e.filename is None:
            e.filename = str(dst)  # "disk full" messages name the file being written
        raise
    fsync_dir(Path(dst).parent)


def fsync_dir(folder: Path) -> None:
    """Make the entries of folder (a rename, a new file) durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    write_atomic(path, lambda f: f.write(data))


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest (sha256 by default, or md5) of a file's content, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
