"""The configured Drive folder and its subfolders: resolved (or created) once, files found by name, listed."""
from __future__ import annotations

import logging
import threading

from sync.backends.base import RemoteFile, split_name
from sync.backends.drive.client import ALL_DRIVES, FIELDS, FOLDER_MIME, DriveClient, remote_file
from sync.errors import RemoteError, SyncError

log = logging.getLogger("sync")


class Folders:
    """sync.folder (a path under My Drive, or id:FOLDER_ID) and its one level of subfolders, by id, cached."""

    def __init__(self, client: DriveClient, folder: str):
        self.client, self.folder = client, folder
        self._lock = threading.Lock()
        self._folder_id: str | None = None
        self.drive_id: str | None = None  # set when sync.folder is in a shared drive
        self._subfolders: dict[str, str] = {}

    def folder_id(self, create: bool = True) -> str | None:
        """The id of the configured folder; path folders are created only when create (None if missing)."""
        with self._lock:
            if self._folder_id is None:
                self._folder_id = self._resolve(create)
            return self._folder_id

    def forget(self) -> None:
        """Drop every cached id (the folder was deleted): the next use looks it up, or creates it, again."""
        with self._lock:
            self._folder_id, self.drive_id = None, None
            self._subfolders.clear()

    def parent(self, subfolder: str, create: bool) -> str | None:
        """The id of the configured folder, or of its subfolder (None if missing and not create)."""
        folder = self.folder_id(create)
        if folder is None or not subfolder:
            return folder
        with self._lock:
            if subfolder not in self._subfolders:
                found = self._child(folder, subfolder, create, f"folder {subfolder!r} in sync.folder")
                if found is None:
                    return None
                self._subfolders[subfolder] = found
            return self._subfolders[subfolder]

    def find(self, name: str, create: bool = False) -> dict | None:
        """The resource of file name (SUB/NAME for a subfolder's), or None; create makes missing folders."""
        sub, base = split_name(name)
        folder = self.parent(sub, create)
        if folder is None:
            return None
        q = f"name = {_q(base)} and {_q(folder)} in parents and trashed = false"
        found = self.client.execute(lambda: self.client.files.list(
            q=q, fields=f"files({FIELDS})", pageSize=100, **self.list_args()), f"looking up {name}")["files"]
        return _oldest(found, name) if found else None

    def by_id(self, file_id: str, name: str) -> dict | None:
        """A file's metadata by id (no listing involved, so no listing lag), or None if it is gone."""
        try:
            res = self.client.execute(lambda: self.client.files.get(
                fileId=file_id, fields=FIELDS + ",trashed", **ALL_DRIVES), f"looking up {name}")
        except RemoteError as e:
            if e.status == 404:
                return None
            raise
        return None if res.get("trashed") else res

    def list(self, subfolder: str = "") -> list[RemoteFile]:
        """Every non-trashed file in the folder (or its subfolder), following nextPageToken."""
        folder = self.parent(subfolder, create=False)
        if folder is None:
            return []
        prefix = f"{subfolder}/" if subfolder else ""
        q = f"{_q(folder)} in parents and trashed = false"
        out, token = [], None
        while True:
            page = self.client.execute(lambda: self.client.files.list(
                q=q, fields=f"nextPageToken,files({FIELDS})", pageSize=1000, pageToken=token, **self.list_args()),
                "listing the Drive folder")
            out += [remote_file(f, prefix + f["name"]) for f in page.get("files", [])
                    if f.get("mimeType") != FOLDER_MIME]
            token = page.get("nextPageToken")
            if not token:
                return out

    def list_args(self) -> dict:
        """files.list flags: shared-drive items included; a shared drive is searched as corpora=drive."""
        args = dict(ALL_DRIVES, includeItemsFromAllDrives=True, spaces="drive")
        if self.drive_id:
            args.update(corpora="drive", driveId=self.drive_id)
        return args

    def _resolve(self, create: bool) -> str | None:
        """The id of sync.folder: an id:FOLDER_ID as given (checked), or its path walked from My Drive."""
        folder = self.folder
        if folder.startswith("id:"):
            fid = folder[3:]
            try:
                res = self.client.execute(lambda: self.client.files.get(fileId=fid, fields="id,driveId", **ALL_DRIVES),
                                          "opening the Drive folder")
            except RemoteError as e:
                if e.status == 404:
                    raise SyncError(f"sync.folder = {folder!r}: no such Drive folder visible to these "
                                    f"credentials (with the drive.file scope only folders this app created "
                                    f"are visible); share it with them, or use a folder path such as "
                                    f"runs/flowers instead.") from None
                raise
            self.drive_id = res.get("driveId")
            return fid
        parent = "root"
        for part in [p for p in folder.strip("/").split("/") if p]:
            parent = self._child(parent, part, create, f"folder {part!r} of sync.folder = {folder!r}")
            if parent is None:
                return None  # read-only commands never create folders
        return parent

    def _child(self, parent: str, name: str, create: bool, what: str) -> str | None:
        """The id of folder name in parent (the oldest of duplicates), created if missing and create."""
        q = f"name = {_q(name)} and {_q(parent)} in parents and mimeType = {_q(FOLDER_MIME)} and trashed = false"
        find = lambda: self.client.execute(lambda: self.client.files.list(  # noqa: E731
            q=q, fields="files(id,createdTime)", pageSize=100, **self.list_args()), "looking up the Drive folder")
        found = find()["files"]
        if not found and not create:
            return None
        if not found:
            created = self._create(name, parent)
            found = find()["files"] or [{"id": created}]  # another process may have created one at the same time
        return _oldest(found, what)["id"]

    def _create(self, name: str, parent: str) -> str:
        """Create a folder with a pre-generated id, so a retry after a lost response makes no second folder."""
        fid = self.client.execute(lambda: self.client.files.generateIds(count=1, space="drive"),
                                  "generating a file id")["ids"][0]
        body = {"id": fid, "name": name, "mimeType": FOLDER_MIME, "parents": [parent]}
        try:
            self.client.execute(lambda: self.client.files.create(body=body, fields="id", **ALL_DRIVES),
                                "creating the Drive folder")
        except RemoteError as e:
            if e.status != 409:
                raise
        return fid


def _q(value: str) -> str:
    """Quote a string for a Drive query."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _oldest(found: list[dict], what: str) -> dict:
    """The oldest by createdTime (then id) of same-named items, with a warning when there are several."""
    chosen = min(found, key=lambda f: (f.get("createdTime", ""), f["id"]))
    if len(found) > 1:
        log.warning("Drive holds %d items named %s; using the oldest (id %s, created %s). Delete or rename the "
                    "others so every machine uses the same one.", len(found), what, chosen["id"],
                    chosen.get("createdTime", "?"))
    return chosen
