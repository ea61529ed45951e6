"""The Drive backend: Drive v3 through google-api-python-client, resumable chunked uploads that survive restarts.

One job per module, like rclone's Drive backend: client (authorized requests under the retry policy), folders
(the folder, lookups by name, listings), upload (one put and its recoveries, PUT_RECOVERIES), resumable (the
resumable session), download (ranged, md5-checked). DriveBackend puts them behind the Backend interface."""
from __future__ import annotations

from pathlib import Path

from sync.backends.base import Backend, RemoteFile
from sync.backends.drive.client import ALL_DRIVES, DriveClient
from sync.backends.drive.download import download
from sync.backends.drive.folders import Folders
from sync.backends.drive.properties import check_properties
from sync.backends.drive.resumable import forget_stale_uploads
from sync.backends.drive.upload import PUT_RECOVERIES, Put, attempt_requests
from sync.config import SyncConfig
from sync.errors import NotFound, RemoteError
from sync.retry import SHARED_DRIVE_DELETE, RetryPolicy

__all__ = ["DriveBackend", "PUT_RECOVERIES", "attempt_requests"]


class DriveBackend(Backend):
    """A Drive folder (a path under My Drive, or id:FOLDER_ID); one authorized client per thread."""

    def __init__(self, config: SyncConfig, state_dir: Path, retry: RetryPolicy):
        self.config, self.state_dir, self.retry = config, state_dir, retry
        self.description = f"Google Drive folder {config.folder}"
        self.chunk = config.chunk_bytes
        self.client = DriveClient(config, state_dir, retry)
        self.folders = Folders(self.client, config.folder)
        self.uploads = state_dir / "uploads"
        forget_stale_uploads(self.uploads)

    def folder_id(self, create: bool = True) -> str | None:
        """The id of the configured folder; path folders are created only when create (None if missing)."""
        return self.folders.folder_id(create)

    def list(self, subfolder: str = "") -> list[RemoteFile]:
        """Every non-trashed file in the folder (or its subfolder), following nextPageToken."""
        return self.folders.list(subfolder)

    def put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        """Upload local as name without duplicates and check Drive's md5Checksum, mending what one more attempt
        can fix (md5 mismatch, refused id, forgotten session, deleted folder) within PUT_RECOVERIES. Properties
        over Drive's size limit are refused before any request."""
        check_properties(name, properties)
        return Put(self.client, self.folders, self.uploads, self.chunk, name, local, properties).run()

    def check_properties(self, name: str, properties: dict[str, str]) -> None:
        """Refuse properties Drive would refuse (over 124 bytes of key plus value), naming the fix."""
        check_properties(name, properties)

    def get(self, name: str, dest: Path, file_id: str = "") -> None:
        """Download name in ranged chunks (resuming a partial file) and check its md5 before renaming it to dest."""
        found = self.folders.by_id(file_id, name) if file_id else self.folders.find(name)
        if found is None:
            raise NotFound(f"{name} is not in the Drive folder {self.config.folder}.")
        download(self.client, found, name, dest, self.chunk)

    def delete(self, name: str) -> None:
        """Delete name from the folder (a missing file is fine)."""
        found = self.folders.find(name)
        if found is None:
            return
        try:
            self.client.execute(lambda: self.client.files.delete(fileId=found["id"], **ALL_DRIVES),
                                f"deleting {name}")
        except RemoteError as e:
            if e.status == 403 and self.folders.drive_id:
                raise RemoteError(f"cannot delete {name} from the shared drive of sync.folder ({e.status} "
                                  f"{', '.join(sorted(e.reasons))}): {SHARED_DRIVE_DELETE}; give these credentials "
                                  f"that role, or delete old snapshots by hand. Uploads are not affected.",
                                  e.status, e.reasons) from None
            if e.status != 404:
                raise
