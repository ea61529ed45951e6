"""The folder backend: a plain directory (a mounted Drive or any local path), written atomically.

The properties of all files live in one catalog file (CATALOG), so listing reads one small file, not one
sidecar per file; files stored without properties (cache shards, the pointer) never touch it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from sync.backends.base import Backend, RemoteFile, split_name
from sync.errors import IntegrityError, NotFound, SyncError
from sync.snapshot import file_digest
from common.files import replace_atomic, write_bytes_atomic

CATALOG = ".catalog.json"
MOUNTED_DRIVE = Path("/content/drive")  # where Colab's drive.mount() puts Google Drive (DriveFS)
MOUNTED_NOTE = ("on a mounted Drive 'verified' means DriveFS's local copy: Google uploads it in the background, so "
                "keep the VM up a minute (or run drive.flush_and_unmount()) before it ends; sync.backend=drive "
                "verifies on Drive itself")


class FolderBackend(Backend):
    """Files live in root; the properties of those stored with some in root/CATALOG."""

    def __init__(self, root: Path):
        self.root = root
        self.mounted_drive = _is_under(root, MOUNTED_DRIVE)
        self.description = f"folder {root}"
        self.note = MOUNTED_NOTE if self.mounted_drive else ""
        if root.exists() and not root.is_dir():
            raise SyncError(f"setting sync.folder = {str(root)!r} is a file, not a directory; point sync.folder at "
                            f"a directory (it is created if missing).")

    def _ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SyncError(f"sync.folder = {str(self.root)!r} cannot be created ({e.strerror}); point "
                            f"sync.folder at a writable directory (in Colab mount Drive first).") from None

    def _catalog(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads((self.root / CATALOG).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_catalog(self, catalog: dict) -> None:
        _write(self.root / CATALOG, json.dumps(catalog, sort_keys=True).encode(), in_place=self.mounted_drive)

    def put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        """Copy local to root/name through a temp file + fsync + rename, then verify its sha256."""
        self._ensure()
        split_name(name)
        dest = self.root / name
        try:
            dest.parent.mkdir(exist_ok=True)
            if self.mounted_drive and local.stat().st_size <= IN_PLACE_MAX and dest.is_file():
                _write(dest, local.read_bytes(), in_place=True)  # a rename would trash the old copy on Drive
            else:
                _copy_verified(local, dest)
            catalog = self._catalog()
            if properties or name in catalog:
                if properties:
                    catalog[name] = dict(properties)
                else:
                    catalog.pop(name)
                self._save_catalog(catalog)
        except OSError as e:
            raise _write_error(e, name, self.root) from None
        st = dest.stat()
        return RemoteFile(name, st.st_size, dict(properties), st.st_mtime, name)

    def get(self, name: str, dest: Path, file_id: str = "") -> None:
        """Copy root/name to dest through a temp file (file_id is the name here)."""
        tmp = dest.with_name(dest.name + ".partial")
        try:
            shutil.copyfile(self.root / name, tmp)
        except FileNotFoundError:
            raise NotFound(f"{name} is not in {self.root}.") from None
        replace_atomic(tmp, dest)

    def list(self, subfolder: str = "") -> list[RemoteFile]:
        """Every complete file in root (or root/subfolder) with its properties (one catalog read, one stat per
        file)."""
        folder = self.root / subfolder
        if not folder.is_dir():
            return []
        catalog = self._catalog()
        prefix = f"{subfolder}/" if subfolder else ""
        out = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_file():
                    name, st = prefix + entry.name, entry.stat()
                    out.append(RemoteFile(name, st.st_size, dict(catalog.get(name, {})), st.st_mtime, name))
        return sorted(out, key=lambda f: f.name)

    def delete(self, name: str) -> None:
        """Remove root/name and its properties; the file is emptied first, so on a mounted Drive its copy in
        the Drive trash holds (almost) no quota."""
        split_name(name)
        path = self.root / name
        try:
            if self.mounted_drive and path.is_file():
                os.truncate(path, 0)
            path.unlink(missing_ok=True)
            catalog = self._catalog()
            if catalog.pop(name, None) is not None:
                self._save_catalog(catalog)
        except OSError as e:
            raise _write_error(e, name, self.root) from None


IN_PLACE_MAX = 1 << 20  # small files (the pointer) are rewritten in place on a mounted Drive


def _is_under(path: Path, root: Path) -> bool:
    try:
        return path.expanduser().absolute().is_relative_to(root)
    except OSError:
        return False


def _copy_verified(local: Path, dest: Path) -> None:
    """Copy to a temp name, fsync, compare sha256, rename into place (the temp file never survives a failure)."""
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        shutil.copyfile(local, tmp)
        if file_digest(tmp) != file_digest(local):
            raise IntegrityError(f"the copy of {dest.name} in {dest.parent} does not match the local file; "
                                 f"the folder's storage is unreliable.")
        replace_atomic(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write(path: Path, data: bytes, in_place: bool) -> None:
    """Write a small file: atomically (temp + rename), or in place (truncate + write + fsync) where a rename
    would leave the old copy in a trash (a mounted Drive); readers of in-place files tolerate a torn one."""
    if in_place and path.is_file():
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    write_bytes_atomic(path, data)


def _write_error(e: OSError, name: str, root: Path) -> SyncError:
    """One line naming the folder and the reason (a full disk says so, and what to do)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SyncError(f"cannot write {name} to {root}: no space left there ({e.strerror}); free space "
                         f"(on a mounted Drive also empty its trash), lower sync.keep, or point sync.folder "
                         f"elsewhere. Training continues; the snapshot stays queued.")
    return SyncError(f"cannot write {name} to {root} ({e.strerror or type(e).__name__}); check that "
                     f"sync.folder is a writable directory. Training continues; the snapshot stays queued.")
