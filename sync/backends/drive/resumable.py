"""Resumable uploads: media read by offset, the session saved before each chunk, resumed after a restart.

Drive's upload guide (https://developers.google.com/drive/api/guides/manage-uploads, "Handle errors"): 5xx and
403 rate limits are retried; "For any 4xx errors (including 403) during a resumable upload, restart the upload.
These errors indicate the upload session has expired and must be restarted by requesting a new session URI."
So any 4xx on a started session that the retry policy does not retry starts a new session (SessionGone, within
the put's one budget), except refusals whose cause a new session cannot change (a full Drive, missing
permissions: sync.retry.has_known_fix), 401 (the credentials, refreshed once already by the transport) and 409
(the pre-generated id is taken: upload.Put checks whose it is)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from googleapiclient.errors import HttpError
from googleapiclient.http import MediaUpload

from sync.backends.drive.client import DriveClient
from sync.errors import RemoteError
from sync.retry import SessionGone, has_known_fix
from common.files import write_text_atomic

log = logging.getLogger("sync")
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
            data = json.loads(path.read_text(encoding="utf-8"))
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


def forget_stale_uploads(uploads: Path) -> None:
    """Delete saved upload sessions too old to resume (e.g. of snapshots superseded before they were sent)."""
    for path in uploads.rglob("*.json"):
        try:
            if time.time() - path.stat().st_mtime > STALE_STATE_S:
                path.unlink()
        except OSError:
            pass


def session_refused(e: RemoteError) -> bool:
    """Whether a refusal of a started session's request means: start a new session (see the module's doc)."""
    return e.status is not None and 400 <= e.status < 500 and e.status not in (401, 409) and not has_known_fix(e)


def send_resumable(client: DriveClient, name: str, local: Path, state: UploadState, request, chunk: int) -> dict:
    """Upload local in chunks through one session (the saved one if Drive still has it); return the resource.

    The session URI and offset are saved before each chunk is sent. A saved session Drive refuses is replaced
    by a new one; a refusal mid-way raises SessionGone (session_refused); a 4xx on the request that starts a
    session is the folder's or file's, and propagates."""
    media = OffsetUpload(local, chunk, resumable=True)
    req = request(media)
    media.on_read = lambda begin: state.save(uri=req.resumable_uri, offset=begin)
    if state.get("uri"):
        acked = session_offset(client, state.get("uri"), state.size, name)
        if isinstance(acked, dict):
            return acked
        if acked is None:
            state.save(uri=None, offset=0)
        else:
            log.info("resuming the upload of %s at byte %d of %d", name, acked, state.size)
            req.resumable_uri, req.resumable_progress = state.get("uri"), acked
    try:
        while True:
            _, done = client.call(lambda: req.next_chunk(num_retries=0), f"uploading {name}")
            if done is not None:
                return done
    except RemoteError as e:
        if req.resumable_uri is None or not session_refused(e):
            raise
        why = ", ".join([f"HTTP {e.status}", *sorted(e.reasons)])
        raise SessionGone(f"Drive refused the upload session of {name} ({why})") from None


def session_offset(client: DriveClient, uri: str, total: int, name: str):
    """Ask a saved session how far it got: the acked byte count, the finished resource, or None if Drive no
    longer takes it (404/410, or any other refusal that session_refused says a new session mends)."""
    def query():
        resp, content = client.http.request(uri, "PUT", body=b"",
                                            headers={"Content-Range": f"bytes */{total}", "Content-Length": "0"})
        if resp.status in (200, 201):
            return json.loads(content)
        if resp.status == 308:
            rng = resp.get("range")
            return int(rng.rsplit("-", 1)[1]) + 1 if rng else 0
        raise HttpError(resp, content, uri=uri)
    try:
        return client.call(query, f"checking the upload session of {name}")
    except RemoteError as e:
        if not session_refused(e):
            raise
        log.info("the saved upload session of %s is refused (%s); starting a new one", name, e.status)
        return None
