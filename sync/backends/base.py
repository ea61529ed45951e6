"""The backend interface: a flat folder of named files, each with string properties."""
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
    """A flat remote folder. put verifies the stored copy; all names are plain file names."""

    description: str = ""
    note: str = ""  # what "uploaded and verified" means on this backend, when it needs saying

    @abc.abstractmethod
    def put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        """Store local as name (replacing any same-named file) and verify the stored copy."""

    @abc.abstractmethod
    def get(self, name: str, dest: Path, file_id: str = "") -> None:
        """Download name (or the file with RemoteFile.id file_id) to dest, written atomically."""

    @abc.abstractmethod
    def list(self) -> list[RemoteFile]:
        """Every file in the folder (not trashed)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove name; a missing file is not an error."""
