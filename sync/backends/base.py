"""The backend interface: a folder of named files, each with string properties.

A name is a plain file name, or `SUB/NAME` for a file in a subfolder (one level: cache/, export/, report/)."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RemoteFile:
    """One stored file: name, size, properties (Drive's public properties), modification time, backend id."""
    name: str
    size: int
    properties: dict[str, str] = field(default_factory=dict)
    modified: float = 0.0
    id: str = ""  # the backend's own handle (a Drive file id); lets get() skip the lookup by name


class Backend(abc.ABC):
    """A remote folder with one level of subfolders. put verifies the stored copy."""

    description: str = ""
    note: str = ""  # what "uploaded and verified" means on this backend, when it needs saying

    @abc.abstractmethod
    def put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        """Store local as name (replacing any same-named file) and verify the stored copy."""

    @abc.abstractmethod
    def get(self, name: str, dest: Path, file_id: str = "") -> None:
        """Download name (or the file with RemoteFile.id file_id) to dest, written atomically."""

    @abc.abstractmethod
    def list(self, subfolder: str = "") -> list[RemoteFile]:
        """Every file in the folder, or in its subfolder (named SUB/NAME), not trashed and not folders."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove name; a missing file is not an error."""

    def check_properties(self, name: str, properties: dict[str, str]) -> None:
        """Raise SyncError (naming the fix) for properties this backend cannot store; by default any fit."""


def split_name(name: str) -> tuple[str, str]:
    """(subfolder, file name) of a backend name; the subfolder is '' for a top-level file."""
    sub, _, base = name.rpartition("/")
    if "/" in sub or not base or name.startswith("/") or ".." in (sub, base):
        raise ValueError(f"backend names are NAME or SUB/NAME, not {name!r}")
    return sub, base
