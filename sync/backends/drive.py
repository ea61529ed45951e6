"""The Drive backend: Drive v3 through google-api-python-client, resumable chunked uploads that survive restarts."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import google.auth.exceptions
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaUpload

from sync.backends.base import Backend, RemoteFile
from sync.backends.google_http import authorized_http, ca_bundle, drive_base_url, load_credentials
from sync.config import SyncConfig
from sync.errors import IntegrityError, SyncError
from sync.retry import RetryPolicy
from sync.snapshot import file_digest

log = logging.getLogger("sync")
FOLDER_MIME = "application/vnd.google-apps.folder"
FIELDS = "id,name,size,md5Checksum,appProperties,modifiedTime,mimeType"
MD5_ATTEMPTS = 3
NEW_SESSION_ATTEMPTS = 3
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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)

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
        self._forget_stale_uploads()

    def _forget_stale_uploads(self) -> None:
        """Delete saved upload sessions too old to resume (e.g. of snapshots superseded before they were sent)."""
        for path in (self.state_dir / "uploads").glob("*.json"):
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
        """Run fn under the retry policy; credential failures become a SyncError without token details."""
        try:
            return self.retry.call(fn, what)
        except google.auth.exceptions.RefreshError:
            raise SyncError(f"sync: Google refused the credentials ({what}); in Colab run "
                            f"auth.authenticate_user() again, or renew the file named by sync.credentials.") \
                from None

    def _execute(self, make_request, what: str):
        return self._call(lambda: make_request().execute(num_retries=0), what)

    # ---- folder and lookup -----------------------------------------------------------------------------
    def folder_id(self) -> str:
        """The id of the configured folder (path folders are created as needed)."""
        with self._folder_lock:
            if self._folder_id is None:
                self._folder_id = self._resolve_folder(self.config.folder)
            return self._folder_id

    def _resolve_folder(self, folder: str) -> str:
        if folder.startswith("id:"):
            fid = folder[3:]
            try:
                self._execute(lambda: self._files.get(fileId=fid, fields="id", supportsAllDrives=True),
                              "opening the Drive folder")
            except HttpError as e:
                if e.resp.status == 404:
                    raise SyncError(f"sync.folder = {folder!r}: no such Drive folder visible to these "
                                    f"credentials (with the drive.file scope only folders this app created "
                                    f"are visible); use a folder path such as runs/flowers instead.") from None
                raise
            return fid
        parent = "root"
        for part in [p for p in folder.strip("/").split("/") if p]:
            q = (f"name = {_q(part)} and {_q(parent)} in parents and mimeType = {_q(FOLDER_MIME)} "
                 f"and trashed = false")
            found = self._execute(lambda: self._files.list(q=q, fields="files(id)", pageSize=10, spaces="drive"),
                                  "looking up the Drive folder")["files"]
            if found:
                parent = found[0]["id"]
                continue
            parent = self._create_folder(part, parent)
        return parent

    def _create_folder(self, name: str, parent: str) -> str:
        """Create a folder with a pre-generated id, so a retry after a lost response makes no second folder."""
        fid = self._execute(lambda: self._files.generateIds(count=1, space="drive"), "generating a file id")["ids"][0]
        body = {"id": fid, "name": name, "mimeType": FOLDER_MIME, "parents": [parent]}
        try:
            self._execute(lambda: self._files.create(body=body, fields="id"), "creating the Drive folder")
        except HttpError as e:
            if e.resp.status != 409:
                raise
        return fid

    def _find(self, name: str) -> dict | None:
        q = f"name = {_q(name)} and {_q(self.folder_id())} in parents and trashed = false"
        found = self._execute(lambda: self._files.list(q=q, fields=f"files({FIELDS})", pageSize=10,
                                                       spaces="drive"), f"looking up {name}")["files"]
        return found[0] if found else None

    def _by_id(self, file_id: str, name: str) -> dict | None:
        """A file's metadata by id (no listing involved, so no listing lag), or None if it is gone."""
        try:
            res = self._execute(lambda: self._files.get(fileId=file_id, fields=FIELDS + ",trashed"),
                                f"looking up {name}")
        except HttpError as e:
            if e.resp.status == 404:
                return None
            raise
        return None if res.get("trashed") else res

    def _remote_file(self, res: dict) -> RemoteFile:
        modified = res.get("modifiedTime")
        ts = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp() if modified else 0.0
        return RemoteFile(res["name"], int(res.get("size", 0)), dict(res.get("appProperties") or {}), ts, res["id"])

    # ---- the interface ---------------------------------------------------------------------------------
    def list(self) -> list[RemoteFile]:
        """Every non-trashed file in the folder, following nextPageToken."""
        q = f"{_q(self.folder_id())} in parents and trashed = false"
        out, token = [], None
        while True:
            page = self._execute(lambda: self._files.list(q=q, fields=f"nextPageToken,files({FIELDS})",
                                                          pageSize=1000, pageToken=token, spaces="drive"),
                                 "listing the Drive folder")
            out += [self._remote_file(f) for f in page.get("files", []) if f.get("mimeType") != FOLDER_MIME]
            token = page.get("nextPageToken")
            if not token:
                return out

    def delete(self, name: str) -> None:
        """Delete name from the folder (a missing file is fine)."""
        found = self._find(name)
        if found is None:
            return
        try:
            self._execute(lambda: self._files.delete(fileId=found["id"]), f"deleting {name}")
        except HttpError as e:
            if e.resp.status != 404:
                raise

    def put(self, name: str, local: Path, properties: dict[str, str]) -> RemoteFile:
        """Upload local as name without duplicates, then check Drive's md5Checksum; re-upload on mismatch."""
        md5, size = file_digest(local, "md5"), local.stat().st_size
        state = UploadState(self.state_dir / "uploads" / f"{name}.json", md5, size)
        existing = self._find(name)
        for attempt in range(MD5_ATTEMPTS + 1):
            if existing is not None and existing.get("md5Checksum") == md5:
                if (existing.get("appProperties") or {}) != properties:
                    existing = self._execute(lambda: self._files.update(
                        fileId=existing["id"], body={"appProperties": properties}, fields=FIELDS),
                        f"updating the properties of {name}")
                state.clear()
                return self._remote_file(existing)
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
        if existing is None:
            if not state.get("file_id"):
                ids = self._execute(lambda: self._files.generateIds(count=1, space="drive"), "generating a file id")
                state.save(file_id=ids["ids"][0])
            body = {"id": state.get("file_id"), "name": name, "parents": [self.folder_id()],
                    "appProperties": properties}
        else:
            body = {"appProperties": properties}
        target = existing["id"] if existing else None

        def request(media):
            if target is None:
                return self._files.create(body=body, media_body=media, fields=FIELDS)
            return self._files.update(fileId=target, body=body, media_body=media, fields=FIELDS)

        try:
            if state.size <= min(self.chunk, MULTIPART_MAX):
                return self._execute(lambda: request(OffsetUpload(local, self.chunk, resumable=False)),
                                     f"uploading {name}")
            return self._upload_resumable(name, local, state, request)
        except HttpError as e:
            if e.resp.status == 409 and target is None:  # an earlier try created it; its response was lost
                return self._execute(lambda: self._files.get(fileId=body["id"], fields=FIELDS), f"checking {name}")
            raise

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
            except HttpError as e:
                if e.resp.status not in (404, 410):
                    raise
                log.warning("the upload session of %s expired (HTTP %d); starting a new one", name,
                            e.resp.status)
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
            raise SyncError(f"sync: {name} is not in the Drive folder {self.config.folder}.")
        size, md5 = int(found.get("size", 0)), found.get("md5Checksum", "")
        part = dest.with_name(f"{dest.name}.{md5[:12]}.partial")
        uri = self._files.get_media(fileId=found["id"]).uri
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
        os.replace(part, dest)

    def _range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes [start, end] of a media URI (one HTTP request; errors are raised for the retry policy)."""
        resp, content = self._http.request(uri, "GET", headers={"Range": f"bytes={start}-{end}"})
        if resp.status == 206:
            return content
        if resp.status == 200:
            return content[start:end + 1]
        raise HttpError(resp, content, uri=uri)
