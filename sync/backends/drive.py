"""The Drive backend: Drive v3 through google-api-python-client, resumable chunked uploads that survive restarts."""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path

from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaUpload

from sync.backends.base import Backend, RemoteFile, split_name
from sync.backends.google_http import authorized_http, ca_bundle, drive_base_url, load_credentials
from sync.config import SyncConfig
from sync.errors import IntegrityError, NotFound, RemoteError, SyncError
from sync.retry import RetryPolicy
from sync.snapshot import file_digest
from common.files import replace_atomic, write_text_atomic

log = logging.getLogger("sync")
# googleapiclient logs each 4xx/5xx it sees; our retry policy already reports each failure once.
logging.getLogger("googleapiclient.http").setLevel(logging.ERROR)
FOLDER_MIME = "application/vnd.google-apps.folder"
# Public `properties`, not `appProperties`: those are "private to the requesting app" (drive.v3.json, File),
# so a second machine with another OAuth client would see the files but not what they are.
FIELDS = "id,name,size,md5Checksum,properties,modifiedTime,createdTime,mimeType"
ALL_DRIVES = {"supportsAllDrives": True}  # required for items in shared drives (Drive guide "Implement shared
                                          # drive support": files.get/list/create/update/delete)
# Recoveries of one put(), each a fresh start of requests that run under the one RetryPolicy (sync.retries
# tries of each request, RetryPolicy.worst_case_wait_s of waiting): none of them retries a failed request
# itself, and none waits. They stack at most RECOVERY_BUDGET deep; a put that exhausts them fails, and the
# uploader keeps the snapshot queued for the next checkpoint, five minutes later, or exit.
MD5_ATTEMPTS = 3          # contents sent again after Drive's md5Checksum disagreed with ours
FRESH_ID_ATTEMPTS = 2     # the saved pre-generated file id, then one new id (400/409 on create)
NEW_SESSION_ATTEMPTS = 3  # resumable sessions started after Drive forgot one (404/410)
FOLDER_ATTEMPTS = 2       # the folder as known, then looked up again once (404 on the parent)
RECOVERY_BUDGET = FOLDER_ATTEMPTS * MD5_ATTEMPTS * FRESH_ID_ATTEMPTS * NEW_SESSION_ATTEMPTS  # sends of one put
MULTIPART_MAX = 5 * 2**20  # Drive's guidance: one multipart request for files up to 5 MB, resumable above
STALE_STATE_S = 7 * 86400  # Drive forgets resumable sessions after about a week


class OffsetUpload(MediaUpload):
    """A media upload that reads the file by offset (never a consumed stream), so any chunk can be re-sent."""

    def __init__(self, path: Path, chunksize: int, resumable: bool):
        super().__init__()
        self._path, self._chunksize, self._resumable = path, chunksize, resumable
        self._size = path.stat().st_size
        self.on_read = None  # called with the offset before each chunk is sent

    def chunksize(self):
        """Bytes per chunk."""
        return self._chunksize

    def mimetype(self):
        """Always binary."""
        return "application/octet-stream"

    def size(self):
        """The file size in bytes."""
        return self._size

    def resumable(self):
        """True for a chunked resumable upload, False for one multipart request."""
        return self._resumable

    def has_stream(self):
        """False: the client must call getbytes() with an offset, never read a shared stream."""
        return False

    def getbytes(self, begin, length):
        """The file's bytes [begin, begin+length)."""
        if self.on_read is not None:
            self.on_read(begin)
        with open(self._path, "rb") as f:
            f.seek(begin)
            return f.read(length)


class UploadState:
    """An upload's session URI, file id and acknowledged offset, persisted so a killed process can resume it."""

    def __init__(self, path: Path, md5: str, size: int):
        self.path, self.md5, self.size = path, md5, size
        self.data = {}
        try:
            data = json.loads(path.read_text())
            if data.get("md5") == md5 and data.get("size") == size:
                self.data = data
        except (OSError, ValueError):
            pass

    def get(self, key):
        """A saved value (None if absent or saved for other content)."""
        return self.data.get(key)

    def save(self, **values) -> None:
        """Record values (atomically) next to the content's md5 and size."""
        self.data.update(values, md5=self.md5, size=self.size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.data))

    def clear(self) -> None:
        """Forget the upload (it finished, or must start over)."""
        self.path.unlink(missing_ok=True)


def _q(value: str) -> str:
    """Quote a string for a Drive query."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class DriveBackend(Backend):
    """A Drive folder (a path under My Drive, or id:FOLDER_ID); one authorized client per thread."""

    def __init__(self, config: SyncConfig, state_dir: Path, retry: RetryPolicy):
        self.config, self.state_dir, self.retry = config, state_dir, retry
        self.description = f"Google Drive folder {config.folder}"
        self.chunk = config.chunk_bytes
        self._credentials = load_credentials(config)
        self._ca = ca_bundle(config, state_dir)
        self._local = threading.local()
        self._folder_lock = threading.Lock()
        self._folder_id: str | None = None
        self._drive_id: str | None = None  # set when sync.folder is in a shared drive
        self._subfolders: dict[str, str] = {}
        self._forget_stale_uploads()

    def _forget_stale_uploads(self) -> None:
        """Delete saved upload sessions too old to resume (e.g. of snapshots superseded before they were sent)."""
        for path in (self.state_dir / "uploads").rglob("*.json"):
            try:
                if time.time() - path.stat().st_mtime > STALE_STATE_S:
                    path.unlink()
            except OSError:
                pass

    # ---- plumbing ------------------------------------------------------------------------------------
    @property
    def _http(self):
        if getattr(self._local, "http", None) is None:
            self._local.http = authorized_http(self._credentials, self.config, self._ca)
        return self._local.http

    @property
    def _files(self):
        if getattr(self._local, "service", None) is None:
            base = drive_base_url(self.config.api_endpoint)
            self._local.service = build("drive", "v3", http=self._http, static_discovery=True, cache_discovery=False,
                                        client_options={"api_endpoint": base} if base else None)
        return self._local.service.files()

    def _call(self, fn, what: str):
        """Run fn under the retry policy (which classifies every failure: retried, or a RemoteError)."""
        return self.retry.call(fn, what)

    def _execute(self, make_request, what: str):
        return self._call(lambda: make_request().execute(num_retries=0), what)

    # ---- folder and lookup -----------------------------------------------------------------------------
    def folder_id(self, create: bool = True) -> str | None:
        """The id of the configured folder; path folders are created only when create (None if missing)."""
        with self._folder_lock:
            if self._folder_id is None:
                self._folder_id = self._resolve_folder(self.config.folder, create)
            return self._folder_id

    def _resolve_folder(self, folder: str, create: bool) -> str | None:
        if folder.startswith("id:"):
            fid = folder[3:]
            try:
                res = self._execute(lambda: self._files.get(fileId=fid, fields="id,driveId", **ALL_DRIVES),
                                    "opening the Drive folder")
            except RemoteError as e:
                if e.status == 404:
                    raise SyncError(f"sync.folder = {folder!r}: no such Drive folder visible to these "
                                    f"credentials (with the drive.file scope only folders this app created "
                                    f"are visible); share it with them, or use a folder path such as "
                                    f"runs/flowers instead.") from None
                raise
            self._drive_id = res.get("driveId")
            return fid
        parent = "root"
        for part in [p for p in folder.strip("/").split("/") if p]:
            parent = self._child_folder(parent, part, create, f"folder {part!r} of sync.folder = {folder!r}")
            if parent is None:
                return None  # read-only commands never create folders
        return parent

    def _child_folder(self, parent: str, name: str, create: bool, what: str) -> str | None:
        """The id of folder name in parent (the oldest of duplicates), created if missing and create."""
        q = f"name = {_q(name)} and {_q(parent)} in parents and mimeType = {_q(FOLDER_MIME)} and trashed = false"
        find = lambda: self._execute(lambda: self._files.list(  # noqa: E731
            q=q, fields="files(id,createdTime)", pageSize=100, **self._list_args()), "looking up the Drive folder")
        found = find()["files"]
        if not found and not create:
            return None
        if not found:
            log.info("creating the Drive folder %r: none is visible to these credentials (with the drive.file "
                     "scope, folders made by other apps are invisible)", name)
            created = self._create_folder(name, parent)
            found = find()["files"] or [{"id": created}]  # another process may have created one at the same time
        return _oldest(found, what)["id"]

    def _parent(self, subfolder: str, create: bool) -> str | None:
        """The id of the configured folder, or of its subfolder (None if missing and not create)."""
        folder = self.folder_id(create)
        if folder is None or not subfolder:
            return folder
        with self._folder_lock:
            if subfolder not in self._subfolders:
                found = self._child_folder(folder, subfolder, create, f"folder {subfolder!r} in sync.folder")
                if found is None:
                    return None
                self._subfolders[subfolder] = found
            return self._subfolders[subfolder]

    def _create_folder(self, name: str, parent: str) -> str:
        """Create a folder with a pre-generated id, so a retry after a lost response makes no second folder."""
        fid = self._execute(lambda: self._files.generateIds(count=1, space="drive"), "generating a file id")["ids"][0]
        body = {"id": fid, "name": name, "mimeType": FOLDER_MIME, "parents": [parent]}
        try:
            self._execute(lambda: self._files.create(body=body, fields="id", **ALL_DRIVES),
                          "creating the Drive folder")
        except RemoteError as e:
            if e.status != 409:
                raise
        return fid

    def _list_args(self) -> dict:
        """files.list flags: shared-drive items included; a shared drive is searched as corpora=drive."""
        args = dict(ALL_DRIVES, includeItemsFromAllDrives=True, spaces="drive")
        if self._drive_id:
            args.update(corpora="drive", driveId=self._drive_id)
        return args

    def _find(self, name: str, create: bool = False) -> dict | None:
        sub, base = split_name(name)
        folder = self._parent(sub, create)
        if folder is None:
            return None
        q = f"name = {_q(base)} and {_q(folder)} in parents and trashed = false"
        found = self._execute(lambda: self._files.list(q=q, fields=f"files({FIELDS})", pageSize=100,
                                                       **self._list_args()), f"looking up {name}")["files"]
        return _oldest(found, name) if found else None

    def _by_id(self, file_id: str, name: str) -> dict | None:
        """A file's metadata by id (no listing involved, so no listing lag), or None if it is gone."""
        try:
            res = self._execute(lambda: self._files.get(fileId=file_id, fields=FIELDS + ",trashed", **ALL_DRIVES),
                                f"looking up {name}")
        except RemoteError as e:
            if e.status == 404:
                return None
            raise
        return None if res.get("trashed") else res

    def _remote_file(self, res: dict, name: str) -> RemoteFile:
        modified = res.get("modifiedTime")
        ts = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp() if modified else 0.0
        return RemoteFile(name, int(res.get("size", 0)), dict(res.get("properties") or {}), ts, res["id"])

    # ---- the interface ---------------------------------------------------------------------------------
    def list(self, subfolder: str = "") -> list[RemoteFile]:
        """Every non-trashed file in the folder (or its subfolder), following nextPageToken."""
        folder = self._parent(subfolder, create=False)
        if folder is None:
            return []
        prefix = f"{subfolder}/" if subfolder else ""
        q = f"{_q(folder)} in parents and trashed = false"
        out, token = [], None
        while True:
            page = self._execute(lambda: self._files.list(q=q, fields=f"nextPageToken,files({FIELDS})",
                                                          pageSize=1000, pageToken=token, **self._list_args()),
                                 "listing the Drive folder")
            out += [self._remote_file(f, prefix + f["name"]) for f in page.get("files", [])
                    if f.get("mimeType") != FOLDER_MIME]
            token = page.get("nextPageToken")
            if not token:
                return out

    def delete(self, name: str) -> None:
        """Delete name from the folder (a missing file is fine)."""
        found = self._find(name)
        if found is None:
            return
        try:
            self._execute(lambda: self._files.delete(fileId=found["id"], **ALL_DRIVES), f"deleting {name}")
        except RemoteError as e:
            if e.status == 403 and self._drive_id:
                raise RemoteError(f"sync: cannot delete {name} from the shared drive of sync.folder ({e.status} "
                                  f"{', '.join(sorted(e.reasons))}): deleting in a shared drive needs the Manager "
                                  f"role (files.delete: 'the user must be an organizer'); give these credentials "
                                  f"that role, or delete old snapshots by hand. Uploads are not affected.",
                                  e.status, e.reasons) from None
            if e.status != 404:
                raise

    def put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        """Upload local as name without duplicates, then check Drive's md5Checksum; re-upload on mismatch.
        If the folder was deleted meanwhile (404 on the parent), it is looked up (or created) again once."""
        try:
            return self._put(name, local, properties)
        except RemoteError as e:
            if e.status != 404:
                raise
            log.warning("the Drive folder of %s is gone (HTTP 404); looking it up again", name)
            with self._folder_lock:
                self._folder_id, self._drive_id = None, None
                self._subfolders.clear()
            return self._put(name, local, properties)

    def _put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        md5, size = file_digest(local, "md5"), local.stat().st_size
        state = UploadState(self.state_dir / "uploads" / f"{name}.json", md5, size)
        existing = self._find(name, create=True)
        for attempt in range(MD5_ATTEMPTS + 1):
            if existing is not None and existing.get("md5Checksum") == md5:
                if (existing.get("properties") or {}) != properties:
                    existing = self._execute(lambda: self._files.update(
                        fileId=existing["id"], body={"properties": properties}, fields=FIELDS, **ALL_DRIVES),
                        f"updating the properties of {name}")
                state.clear()
                return self._remote_file(existing, name)
            if attempt == MD5_ATTEMPTS:
                break
            if attempt:
                log.warning("%s on Drive does not match the local md5 (corrupted in transit); "
                            "uploading it again", name)
                state.clear()
                state = UploadState(state.path, md5, size)
            existing = self._upload(name, local, properties, state, existing)
        state.clear()
        raise IntegrityError(f"sync: {name} arrived corrupted on Drive {MD5_ATTEMPTS} times (md5 mismatch); "
                             f"the snapshot stays queued and is retried later.")

    def _upload(self, name: str, local: Path, properties: dict, state: UploadState, existing: dict | None) -> dict:
        """Send the content once (create with a pre-generated id, or update existing); return the resource."""
        if existing is not None:
            body = {"properties": properties}
            return self._send(name, local, state, lambda media: self._files.update(
                fileId=existing["id"], body=body, media_body=media, fields=FIELDS, **ALL_DRIVES))
        for fresh_id in (attempt > 0 for attempt in range(FRESH_ID_ATTEMPTS)):
            if fresh_id or not state.get("file_id"):
                ids = self._execute(lambda: self._files.generateIds(count=1, space="drive"), "generating a file id")
                state.save(file_id=ids["ids"][0], uri=None, offset=0)
            sub, base = split_name(name)
            body = {"id": state.get("file_id"), "name": base, "parents": [self._parent(sub, create=True)],
                    "properties": properties}
            try:
                return self._send(name, local, state, lambda media: self._files.create(
                    body=body, media_body=media, fields=FIELDS, **ALL_DRIVES))
            except RemoteError as e:
                if e.status not in (400, 409):
                    raise
                mine = self._by_id(body["id"], name) if e.status == 409 else None
                if mine is not None and mine.get("name") == base:
                    return mine  # an earlier try created it and its response was lost (put() checks the md5)
                log.warning("the saved file id for %s is not usable any more (HTTP %d); using a new one",
                            name, e.status)
        raise SyncError(f"sync: Drive refused every new file id for {name}; the snapshot stays queued.")

    def _send(self, name: str, local: Path, state: UploadState, request) -> dict:
        """One multipart request for small files, else a chunked resumable upload."""
        if state.size <= min(self.chunk, MULTIPART_MAX):
            return self._execute(lambda: request(OffsetUpload(local, self.chunk, resumable=False)),
                                 f"uploading {name}")
        return self._upload_resumable(name, local, state, request)

    def _upload_resumable(self, name: str, local: Path, state: UploadState, request) -> dict:
        """Chunked resumable upload; the session URI and offset are saved before each chunk is sent."""
        for _ in range(NEW_SESSION_ATTEMPTS):
            media = OffsetUpload(local, self.chunk, resumable=True)
            req = request(media)
            media.on_read = lambda begin: state.save(uri=req.resumable_uri, offset=begin)
            if state.get("uri"):
                acked = self._session_offset(state.get("uri"), state.size, name)
                if isinstance(acked, dict):
                    return acked
                if acked is None:
                    state.save(uri=None, offset=0)
                else:
                    log.info("resuming the upload of %s at byte %d of %d", name, acked, state.size)
                    req.resumable_uri, req.resumable_progress = state.get("uri"), acked
            try:
                while True:
                    _, done = self._call(lambda: req.next_chunk(num_retries=0), f"uploading {name}")
                    if done is not None:
                        return done
            except RemoteError as e:
                if e.status not in (404, 410):
                    raise
                log.warning("the upload session of %s expired (HTTP %d); starting a new one", name, e.status)
                state.save(uri=None, offset=0)
        raise SyncError(f"sync: the upload sessions of {name} kept expiring; the snapshot stays queued.")

    def _session_offset(self, uri: str, total: int, name: str):
        """Ask a saved session how far it got: the acked byte count, the finished resource, or None if expired."""
        def query():
            resp, content = self._http.request(uri, "PUT", body=b"",
                                               headers={"Content-Range": f"bytes */{total}", "Content-Length": "0"})
            if resp.status in (200, 201):
                return json.loads(content)
            if resp.status == 308:
                rng = resp.get("range")
                return int(rng.rsplit("-", 1)[1]) + 1 if rng else 0
            if resp.status in (404, 410):
                return None
            raise HttpError(resp, content, uri=uri)
        return self._call(query, f"checking the upload session of {name}")

    def get(self, name: str, dest: Path, file_id: str = "") -> None:
        """Download name in ranged chunks (resuming a partial file) and check its md5 before renaming it to dest."""
        found = self._by_id(file_id, name) if file_id else self._find(name)
        if found is None:
            raise NotFound(f"sync: {name} is not in the Drive folder {self.config.folder}.")
        size, md5 = int(found.get("size", 0)), found.get("md5Checksum", "")
        part = dest.with_name(f"{dest.name}.{md5[:12]}.partial")
        uri = self._files.get_media(fileId=found["id"], **ALL_DRIVES).uri
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        with open(part, "ab") as out:
            while have < size:
                end = min(have + self.chunk, size) - 1
                data = self._call(lambda: self._range(uri, have, end), f"downloading {name}")
                out.write(data)
                out.flush()
                have += len(data)
        if md5 and file_digest(part, "md5") != md5:
            part.unlink()
            raise IntegrityError(f"sync: {name} downloaded with the wrong md5; it was not used.")
        replace_atomic(part, dest)

    def _range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes [start, end] of a media URI (one HTTP request; errors are raised for the retry policy)."""
        resp, content = self._http.request(uri, "GET", headers={"Range": f"bytes={start}-{end}"})
        if resp.status == 206:
            return content
        if resp.status == 200:
            return content[start:end + 1]
        raise HttpError(resp, content, uri=uri)


def _oldest(found: list[dict], what: str) -> dict:
    """The oldest by createdTime (then id) of same-named items, with a warning when there are several."""
    chosen = min(found, key=lambda f: (f.get("createdTime", ""), f["id"]))
    if len(found) > 1:
        log.warning("Drive holds %d items named %s; using the oldest (id %s, created %s). Delete or rename the "
                    "others so every machine uses the same one.", len(found), what, chosen["id"],
                    chosen.get("createdTime", "?"))
    return chosen
