"""One put to Drive: attempts that create (with a pre-generated id) or update in place, checked by md5, and
what mends each failure one more attempt can fix, within the one budget PUT_RECOVERIES."""
from __future__ import annotations

from pathlib import Path

from sync.backends.base import RemoteFile, split_name
from sync.backends.drive.client import ALL_DRIVES, FIELDS, DriveClient, remote_file
from sync.backends.drive.folders import Folders
from sync.backends.drive.resumable import OffsetUpload, UploadState, send_resumable
from sync.errors import RemoteError
from sync.retry import Md5Mismatch, ParentGone, Recover, Recoveries, SessionGone, StaleId
from sync.snapshot import file_digest

MULTIPART_MAX = 5 * 2**20  # Drive's guidance: one multipart request for files up to 5 MB, resumable above
# The only recoveries of the Drive backend: how often one put may mend each kind of failure, and in all. A put
# makes at most PUT_RECOVERIES.attempts (5) attempts; each attempt's requests run under RetryPolicy.call, so
# one put costs at most RetryPolicy.worst_case(attempt_requests(...), PUT_RECOVERIES). A put that spends them
# fails; the uploader keeps the snapshot queued for the next checkpoint, five minutes later, or exit.
PUT_RECOVERIES = Recoveries({
    Md5Mismatch: 2,  # the content sent again after Drive's md5Checksum disagreed with ours
    StaleId: 1,      # a new pre-generated file id after Drive refused the saved one (400/409)
    SessionGone: 2,  # a new resumable session after Drive refused one (any 4xx it may mend: resumable.py)
    ParentGone: 1,   # the folder looked up (or created) again after a 404 on it
}, total=4)
FOLDER_LEVEL_REQUESTS = 4  # a folder looked up again: list, generateIds, create, list once more


def attempt_requests(size: int, chunk: int, folder_levels: int) -> int:
    """The most requests (calls of RetryPolicy.call) one attempt of a put makes, if Drive acknowledges each
    chunk whole: folder_levels folders looked up again, the lookup by name, a new file id, the upload (one
    multipart request; or a saved session's query and one per chunk, the first of which starts the session),
    the check of the id after a 409 and a properties update."""
    upload = 1 if size <= min(chunk, MULTIPART_MAX) else 1 + max(1, -(-size // chunk))
    return FOLDER_LEVEL_REQUESTS * folder_levels + 4 + upload


class Put:
    """One put of local as name: its attempts, and the mending of each recoverable failure before the next."""

    def __init__(self, client: DriveClient, folders: Folders, uploads: Path, chunk: int, name: str, local: Path,
                 properties: dict[str, str]):
        self.client, self.folders, self.chunk = client, folders, chunk
        self.name, self.local, self.properties = name, local, properties
        self.md5, self.size = file_digest(local, "md5"), local.stat().st_size
        self.state = UploadState(uploads / f"{name}.json", self.md5, self.size)
        self.existing: dict | None = None  # the same-named file on Drive, once looked up
        self.looked_up = False

    def run(self) -> RemoteFile:
        """Attempt the put until Drive holds the verified content, within PUT_RECOVERIES."""
        return self.client.retry.call_with_recovery(self.attempt, PUT_RECOVERIES, f"uploading {self.name}", {
            Md5Mismatch: self.send_again, StaleId: self.new_id, SessionGone: self.new_session,
            ParentGone: self.look_up_again})

    def attempt(self) -> RemoteFile:
        """Look the file up (once), send the content unless Drive already has it, check Drive's md5, and set
        the properties."""
        try:
            if not self.looked_up:
                self.existing, self.looked_up = self.folders.find(self.name, create=True), True
            res = self.existing
            if res is None or res.get("md5Checksum") != self.md5:
                res = self._upload()
                if res.get("md5Checksum") != self.md5:
                    self.state.clear()
                    raise Md5Mismatch(f"{self.name} arrived corrupted on Drive", res)
            if (res.get("properties") or {}) != self.properties:
                fid, body = res["id"], {"properties": self.properties}
                res = self.client.execute(lambda: self.client.files.update(
                    fileId=fid, body=body, fields=FIELDS, **ALL_DRIVES), f"updating the properties of {self.name}")
        except RemoteError as e:
            if e.status != 404:
                raise
            raise ParentGone(str(e)) from None
        self.state.clear()
        return remote_file(res, self.name)

    # ---- what mends each failure (run by RetryPolicy.call_with_recovery, never waiting) -----------------
    def send_again(self, exc: Recover) -> None:
        """After an md5 mismatch: replace the stored copy in place, through a new upload."""
        self.existing = exc.resource
        self.state = UploadState(self.state.path, self.md5, self.size)

    def new_id(self, exc: Recover) -> None:
        """After Drive refused the saved file id: the next attempt generates another."""
        self.state.save(file_id=None, uri=None, offset=0)

    def new_session(self, exc: Recover) -> None:
        """After Drive refused the upload session: the next attempt starts a new one."""
        self.state.save(uri=None, offset=0)

    def look_up_again(self, exc: Recover) -> None:
        """After a 404 on the folder or the file: look both up (or create the folder) again."""
        self.folders.forget()
        self.looked_up = False

    # ---- one attempt's upload ------------------------------------------------------------------------
    def _upload(self) -> dict:
        """Send the content once: update the existing file in place, or create it; return the resource."""
        if self.existing is None:
            return self._create()
        fid, body = self.existing["id"], {"properties": self.properties}
        return self._send(lambda media: self.client.files.update(
            fileId=fid, body=body, media_body=media, fields=FIELDS, **ALL_DRIVES))

    def _create(self) -> dict:
        """Create the file with the saved pre-generated id (or a new one), so the retry of a create whose
        response was lost gets a 409, never a second file."""
        if not self.state.get("file_id"):
            ids = self.client.execute(lambda: self.client.files.generateIds(count=1, space="drive"),
                                      "generating a file id")
            self.state.save(file_id=ids["ids"][0], uri=None, offset=0)
        sub, base = split_name(self.name)
        body = {"id": self.state.get("file_id"), "name": base, "parents": [self.folders.parent(sub, create=True)],
                "properties": self.properties}
        try:
            return self._send(lambda media: self.client.files.create(
                body=body, media_body=media, fields=FIELDS, **ALL_DRIVES))
        except RemoteError as e:
            if e.status not in (400, 409):
                raise
            mine = self.folders.by_id(body["id"], self.name) if e.status == 409 else None
            if mine is not None and mine.get("name") == base:
                return mine  # an earlier try created it and its response was lost (attempt() checks the md5)
            raise StaleId(f"Drive refused the saved file id of {self.name} (HTTP {e.status})") from None

    def _send(self, request) -> dict:
        """One multipart request for small files, else a chunked resumable upload."""
        if self.size <= min(self.chunk, MULTIPART_MAX):
            return self.client.execute(lambda: request(OffsetUpload(self.local, self.chunk, resumable=False)),
                                       f"uploading {self.name}")
        return send_resumable(self.client, self.name, self.local, self.state, request, self.chunk)
