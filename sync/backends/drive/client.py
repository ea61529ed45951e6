"""The authorized Drive v3 client of one backend: one per thread, every request under the one retry policy."""
from __future__ import annotations

import logging
import threading
from datetime import datetime
from pathlib import Path

from googleapiclient.discovery import build

from sync.backends.base import RemoteFile
from sync.backends.google_http import authorized_http, ca_bundle, drive_base_url, load_credentials
from sync.config import SyncConfig
from sync.retry import RetryPolicy

# googleapiclient logs each 4xx/5xx it sees; our retry policy already reports each failure once.
logging.getLogger("googleapiclient.http").setLevel(logging.ERROR)
FOLDER_MIME = "application/vnd.google-apps.folder"
# Public `properties`, not `appProperties`: those are "private to the requesting app" (drive.v3.json, File),
# so a second machine with another OAuth client would see the files but not what they are.
FIELDS = "id,name,size,md5Checksum,properties,modifiedTime,createdTime,mimeType"
ALL_DRIVES = {"supportsAllDrives": True}  # required for items in shared drives (Drive guide "Implement shared
                                          # drive support": files.get/list/create/update/delete)


class DriveClient:
    """Credentials, the CA bundle and the retry policy of one backend; an authorized client per thread."""

    def __init__(self, config: SyncConfig, state_dir: Path, retry: RetryPolicy):
        self.config, self.retry = config, retry
        self._credentials = load_credentials(config)
        self._ca = ca_bundle(config, state_dir)
        self._local = threading.local()

    @property
    def http(self):
        """This thread's authorized httplib2 transport."""
        if getattr(self._local, "http", None) is None:
            self._local.http = authorized_http(self._credentials, self.config, self._ca)
        return self._local.http

    @property
    def files(self):
        """This thread's Drive v3 `files` collection."""
        if getattr(self._local, "service", None) is None:
            base = drive_base_url(self.config.api_endpoint)
            self._local.service = build("drive", "v3", http=self.http, static_discovery=True, cache_discovery=False,
                                        client_options={"api_endpoint": base} if base else None)
        return self._local.service.files()

    def call(self, fn, what: str):
        """Run fn under the retry policy (which classifies every failure: retried, or a RemoteError)."""
        return self.retry.call(fn, what)

    def execute(self, make_request, what: str):
        """Build a request with make_request and execute it under the retry policy (a fresh request per try)."""
        return self.call(lambda: make_request().execute(num_retries=0), what)


def remote_file(res: dict, name: str) -> RemoteFile:
    """A Drive file resource as the backend interface's RemoteFile called name."""
    modified = res.get("modifiedTime")
    ts = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp() if modified else 0.0
    return RemoteFile(name, int(res.get("size", 0)), dict(res.get("properties") or {}), ts, res["id"])
