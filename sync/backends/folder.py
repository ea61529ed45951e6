"""The folder backend: a plain directory (a mounted Drive or any local path), written atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sync.backends.base import Backend, RemoteFile
from sync.errors import IntegrityError, SyncError
from sync.snapshot import file_digest

_PROPS = ".props"  # sidecar folder holding each file's properties as JSON


class FolderBackend(Backend):
    """Files live in root; properties in root/.props/<name>.json (written after the file is in place)."""

    def __init__(self, root: Path):
        self.root = root
        self.description = f"folder {root}"

    def _ensure(self) -> None:
        try:
            (self.root / _PROPS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SyncError(f"sync.folder = {str(self.root)!r} cannot be created ({e.strerror}); point "
                            f"sync.folder at a writable directory (in Colab mount Drive first).") from None

    def put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        """Copy local to root/name through a temp file + fsync + rename, then verify its sha256."""
        self._ensure()
        dest = self.root / name
        tmp = dest.with_name(f".{name}.partial")
        shutil.copyfile(local, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if file_digest(tmp) != file_digest(local):
            tmp.unlink()
            raise IntegrityError(f"sync: the copy of {name} in {self.root} does not match the local file; "
                                 f"the folder's storage is unreliable.")
        os.replace(tmp, dest)
        _write_json(self.root / _PROPS / f"{name}.json", properties)
        return RemoteFile(name, dest.stat().st_size, dict(properties), dest.stat().st_mtime, name)

    def get(self, name: str, dest: Path, file_id: str = "") -> None:
        """Copy root/name to dest through a temp file (file_id is the name here)."""
        tmp = dest.with_name(dest.name + ".partial")
        try:
            shutil.copyfile(self.root / name, tmp)
        except FileNotFoundError:
            raise SyncError(f"sync: {name} is not in {self.root}.") from None
        os.replace(tmp, dest)

    def list(self) -> list[RemoteFile]:
        """Every complete file in root with its properties."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                props_path = self.root / _PROPS / f"{path.name}.json"
                try:
                    props = json.loads(props_path.read_text())
                except (OSError, ValueError):
                    props = {}
                st = path.stat()
                out.append(RemoteFile(path.name, st.st_size, props, st.st_mtime, path.name))
        return out

    def delete(self, name: str) -> None:
        """Remove root/name and its properties."""
        for path in (self.root / name, self.root / _PROPS / f"{name}.json"):
            path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)
