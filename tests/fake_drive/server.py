"""A Drive-v3-compatible fake over HTTPS on 127.0.0.1, with faults injected on demand.

Implements what the sync Drive backend (and the real google-api-python-client) use: files.create (metadata,
multipart, resumable), files.list with q, files.get (metadata and alt=media with Range), files.update (metadata
and media), files.delete, files.generateIds, and an OAuth token endpoint. Bearer tokens are checked.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import re
import socket
import ssl
import struct
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.fake_drive.query import QueryError, parse
from tests.fake_drive.tls import make_certificate

FOLDER_MIME = "application/vnd.google-apps.folder"
FAULTS = ("429", "403-rate", "500", "503", "quota", "reset", "stall", "drop", "expire", "corrupt", "401")


@dataclass
class Fault:
    """One injected fault: `kind` on the `times` requests of category `on` after skipping `skip` of them."""
    kind: str
    on: str
    times: int = 1
    skip: int = 0
    seconds: float = 3.0
    status: int = 404
    retry_after: str | None = None
    hits: int = 0


@dataclass
class Session:
    """A resumable upload session."""
    id: str
    metadata: dict
    file_id: str | None  # set for files.update uploads
    total: int | None
    data: bytearray = field(default_factory=bytearray)
    done: dict | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class FakeDrive:
    """The fake's state plus the HTTPS server thread; use as a context manager or call start()/stop()."""

    def __init__(self, cert_dir: Path):
        self.cert, self.key = make_certificate(cert_dir)
        self.lock = threading.RLock()
        self.files: dict[str, dict] = {}
        self.content: dict[str, bytes] = {}
        self.sessions: dict[str, Session] = {}
        self.generated: set[str] = set()
        self.faults: list[Fault] = []
        self.tokens: set[str] = set()
        self.log: list[tuple[str, str, str]] = []  # (category, method, path)
        self.token_requests = 0
        self.sessions_started = 0
        self.chunk_bytes_received = 0  # every byte of every upload chunk body, re-sent ones included
        self.chunk_bytes_duplicated = 0  # bytes received again for offsets already stored
        self.short_bodies = 0  # requests whose body was shorter than their Content-Length (a consumed stream)
        self.stopping = threading.Event()
        self.listing_lags = False  # while True, new files stay out of files.list results (search index lag)
        self.unindexed: set[str] = set()
        self._ids = itertools.count(1)
        self.files["root"] = {"id": "root", "name": "My Drive", "mimeType": FOLDER_MIME, "parents": [],
                              "trashed": False, "appProperties": {}, "createdTime": _now(), "modifiedTime": _now()}

    # ---- control -------------------------------------------------------------------------------------
    def start(self) -> "FakeDrive":
        """Serve on a free 127.0.0.1 port in a daemon thread."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.fake = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release stalled handlers."""
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    @property
    def token_uri(self) -> str:
        return f"{self.url}token"

    def inject(self, kind: str, on: str, times: int = 1, skip: int = 0, **kw) -> Fault:
        """Make the next `times` requests of category `on` (after `skip`) fail with `kind`."""
        assert kind in FAULTS, kind
        fault = Fault(kind, on, times, skip, **kw)
        with self.lock:
            self.faults.append(fault)
        return fault

    def revoke_tokens(self) -> None:
        """Make every issued access token invalid (the client must refresh at the token endpoint)."""
        with self.lock:
            self.tokens.clear()

    # ---- queries for assertions ------------------------------------------------------------------------
    def live_files(self, name: str | None = None) -> list[dict]:
        """Non-folder, non-trashed files (optionally by name)."""
        with self.lock:
            return [f for f in self.files.values() if f["mimeType"] != FOLDER_MIME and not f["trashed"]
                    and (name is None or f["name"] == name)]

    def path_of(self, file: dict) -> str:
        """The folder path of a file, like runs/flowers/latest.json."""
        parts = [file["name"]]
        parent = file["parents"][0] if file["parents"] else None
        while parent and parent != "root":
            parts.append(self.files[parent]["name"])
            parent = self.files[parent]["parents"][0] if self.files[parent]["parents"] else None
        return "/".join(reversed(parts))

    def add_file(self, name: str, data: bytes, parent: str = "root", app_properties: dict | None = None) -> dict:
        """Put a file straight into the fake (for tests that prepare a remote)."""
        with self.lock:
            return self._store({"name": name, "parents": [parent], "appProperties": app_properties or {}},
                               data, None)

    # ---- behaviour ---------------------------------------------------------------------------------------
    def take_fault(self, category: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.on in (category, "any") and fault.hits < fault.skip + fault.times:
                    fault.hits += 1
                    if fault.hits > fault.skip:
                        return fault
                    return None
        return None

    def new_id(self) -> str:
        return f"fid{next(self._ids):05d}{uuid.uuid4().hex[:8]}"

    def _store(self, meta: dict, data: bytes | None, file_id: str | None) -> dict:
        """Create (file_id None) or update a file with metadata and optional content; return the resource."""
        now = _now()
        if file_id is None:
            file_id = meta.get("id") or self.new_id()
            res = {"id": file_id, "name": meta.get("name", "Untitled"),
                   "mimeType": meta.get("mimeType", "application/octet-stream"),
                   "parents": list(meta.get("parents") or ["root"]), "trashed": False,
                   "appProperties": dict(meta.get("appProperties") or {}), "createdTime": now}
            self.files[file_id] = res
            if self.listing_lags:
                self.unindexed.add(file_id)
        else:
            res = self.files[file_id]
            for key in ("name", "mimeType", "trashed"):
                if key in meta:
                    res[key] = meta[key]
            for k, v in (meta.get("appProperties") or {}).items():
                if v is None:
                    res["appProperties"].pop(k, None)
                else:
                    res["appProperties"][k] = v
        res["modifiedTime"] = now
        if data is not None:
            self.content[file_id] = bytes(data)
            res["md5Checksum"] = hashlib.md5(data).hexdigest()
            res["size"] = str(len(data))
        return res


class _Reset(Exception):
    """Abort the connection with a TCP reset."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeDrive/1"

    def log_message(self, *args):  # keep test output quiet
        pass

    @property
    def fake(self) -> FakeDrive:
        return self.server.fake

    # ---- plumbing -----------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | None = None, headers: dict | None = None) -> None:
        stall, self.stall = getattr(self, "stall", None), None
        if stall is not None:  # the request took effect, but its response is lost
            self.fake.stopping.wait(stall.seconds)
            self._reset()
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if isinstance(body, dict):
            self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, reason: str, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"code": status, "message": message,
                                      "errors": [{"domain": "global", "reason": reason, "message": message}]}},
                   headers)

    def _reset(self) -> None:
        """Close the TCP connection with RST (SO_LINGER 0), like a dropped network."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        raise _Reset

    def _body(self, partial: bool = False) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if partial:
            return self.rfile.read(n // 2)
        return self.rfile.read(n) if n else b""

    def _apply_fault(self, fault: Fault, body_read: bool) -> bool:
        """Act out a fault that ends the request here; return False if it must be handled by the caller."""
        if fault.kind in ("stall", "drop"):  # drop: the request takes effect, the connection drops at once
            # acted out by _send: hold the response (a stall), then drop the connection
            self.stall = fault if fault.kind == "stall" else Fault("stall", fault.on, seconds=0)
            return False
        if fault.kind in ("expire", "corrupt"):
            return False
        if fault.kind == "reset":
            if not body_read:
                self._body(partial=True)
            self._reset()
        if not body_read:
            self._body()
        if fault.kind == "429":
            self._error(429, "rateLimitExceeded", "Too many requests",
                        {"Retry-After": fault.retry_after} if fault.retry_after else None)
        elif fault.kind == "403-rate":
            self._error(403, "userRateLimitExceeded", "User rate limit exceeded")
        elif fault.kind == "quota":
            self._error(403, "storageQuotaExceeded", "The user's Drive storage quota has been exceeded.")
        elif fault.kind == "401":
            self._error(401, "authError", "Invalid Credentials")
        else:
            self._error(int(fault.kind), "backendError", "Backend Error")
        return True

    def _dispatch(self, method: str) -> None:
        self.stall = None
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        path = url.path
        try:
            if path == "/token" and method == "POST":
                return self._token()
            if not self._authorized():
                self._body()
                return self._error(401, "authError", "Invalid Credentials")
            route = self._route(method, path, query)
            if route is None:
                self._body()
                return self._error(404, "notFound", f"no route {method} {path}")
            category, handler, args = route
            with self.fake.lock:
                self.fake.log.append((category, method, path))
            fault = self.fake.take_fault(category)
            if fault and self._apply_fault(fault, body_read=False):
                return
            handler(query, fault, *args)
        except _Reset:
            return
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.fake.tokens

    def _route(self, method, path, query):
        m = re.fullmatch(r"/drive/v3/files(?:/([^/]+))?", path)
        if m:
            fid = m.group(1)
            if fid == "generateIds" and method == "GET":
                return "generateIds", self._generate_ids, ()
            if fid is None:
                return {"GET": ("list", self._list, ()), "POST": ("create-meta", self._create_metadata, ())}.get(method)
            table = {"GET": ("media" if query.get("alt") == "media" else "get", self._get, (fid,)),
                     "PATCH": ("update", self._update_metadata, (fid,)), "DELETE": ("delete", self._delete, (fid,))}
            return table.get(method)
        m = re.fullmatch(r"/upload/drive/v3/files(?:/([^/]+))?", path)
        if m:
            fid = m.group(1)
            if method == "PUT" and query.get("upload_id"):
                has_data = self.headers.get("Content-Range", "").startswith("bytes */") is False
                return ("chunk" if has_data else "status"), self._chunk, (query["upload_id"],)
            if method in ("POST", "PATCH") and (method == "POST") == (fid is None):
                kind = query.get("uploadType")
                if kind == "multipart":
                    return "create", self._multipart, (fid,)
                if kind == "resumable":
                    return "start", self._start_resumable, (fid,)
        return None

    # ---- endpoints ----------------------------------------------------------------------------------------
    def _token(self) -> None:
        form = dict(urllib.parse.parse_qsl(self._body().decode()))
        with self.fake.lock:
            self.fake.token_requests += 1
            fault = self.fake.take_fault("token")
        if fault and self._apply_fault(fault, body_read=True):
            return
        if form.get("grant_type") not in ("refresh_token", "urn:ietf:params:oauth:grant-type:jwt-bearer"):
            return self._send(400, {"error": "unsupported_grant_type"})
        token = f"fake-access-{uuid.uuid4().hex}"
        with self.fake.lock:
            self.fake.tokens.add(token)
        self._send(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    def _generate_ids(self, query, fault) -> None:
        count = int(query.get("count", 10))
        ids = [self.fake.new_id() for _ in range(count)]
        with self.fake.lock:
            self.fake.generated.update(ids)
        self._send(200, {"kind": "drive#generatedIds", "space": "drive", "ids": ids})

    def _list(self, query, fault) -> None:
        try:
            pred = parse(query.get("q", ""))
        except QueryError as e:
            return self._error(400, "invalidQuery", str(e))
        with self.fake.lock:
            found = sorted((f for f in self.fake.files.values()
                            if f["id"] != "root" and f["id"] not in self.fake.unindexed and pred(f)),
                           key=lambda f: (f["createdTime"], f["id"]))
        size = min(int(query.get("pageSize", 100)), 1000)
        start = int(query.get("pageToken", 0))
        page = {"kind": "drive#fileList", "files": [dict(f) for f in found[start:start + size]]}
        if start + size < len(found):
            page["nextPageToken"] = str(start + size)
        self._send(200, page)

    def _check_new_id(self, meta: dict) -> bool:
        """Reject a client-chosen id that is unknown or taken (409), as Drive does."""
        fid = meta.get("id")
        if fid is None:
            return True
        if fid in self.fake.files:
            self._error(409, "duplicate", "A file already exists with the provided ID.")
            return False
        if fid not in self.fake.generated:
            self._error(400, "invalid", "The provided file ID is not usable.")
            return False
        return True

    def _create_metadata(self, query, fault) -> None:
        meta = json.loads(self._body() or b"{}")
        with self.fake.lock:
            if not self._check_new_id(meta):
                return
            res = self.fake._store(meta, None, None)
        self._send(200, res)

    def _get(self, query, fault, fid) -> None:
        self._body()
        with self.fake.lock:
            res = self.fake.files.get(fid)
            data = self.fake.content.get(fid, b"")
        if res is None:
            return self._error(404, "notFound", f"File not found: {fid}.")
        if query.get("alt") != "media":
            return self._send(200, res)
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return self._send(206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        self._send(200, data)

    def _update_metadata(self, query, fault, fid) -> None:
        meta = json.loads(self._body() or b"{}")
        with self.fake.lock:
            if fid not in self.fake.files:
                return self._error(404, "notFound", f"File not found: {fid}.")
            self._send(200, self.fake._store(meta, None, fid))

    def _delete(self, query, fault, fid) -> None:
        self._body()
        with self.fake.lock:
            if self.fake.files.pop(fid, None) is None:
                return self._error(404, "notFound", f"File not found: {fid}.")
            self.fake.content.pop(fid, None)
        self._send(204)

    def _multipart(self, query, fault, fid) -> None:
        body = self._body()
        boundary = re.search(r'boundary="?([^";]+)"?', self.headers.get("Content-Type", "")).group(1).encode()
        parts = []
        for chunk in body.split(b"--" + boundary)[1:-1]:
            chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:]
            head, _, content = re.split(rb"(\r?\n\r?\n)", chunk, maxsplit=1)
            content = content[:-2] if content.endswith(b"\r\n") else content[:-1]
            parts.append(content)
        meta, data = json.loads(parts[0] or b"{}"), parts[1]
        with self.fake.lock:
            if fid is None and not self._check_new_id(meta):
                return
            if fid is not None and fid not in self.fake.files:
                return self._error(404, "notFound", f"File not found: {fid}.")
            if fault and fault.kind == "corrupt":
                data = _corrupt(data)
            res = self.fake._store(meta, data, fid)
        self._send(200, res)

    def _start_resumable(self, query, fault, fid) -> None:
        meta = json.loads(self._body() or b"{}")
        with self.fake.lock:
            if fid is None and not self._check_new_id(meta):
                return
            if fid is not None and fid not in self.fake.files:
                return self._error(404, "notFound", f"File not found: {fid}.")
            total = self.headers.get("X-Upload-Content-Length")
            session = Session(uuid.uuid4().hex, meta, fid, int(total) if total else None)
            self.fake.sessions[session.id] = session
            self.fake.sessions_started += 1
        base = "/upload/drive/v3/files" + (f"/{fid}" if fid else "")
        location = f"{self.fake.url.rstrip('/')}{base}?uploadType=resumable&upload_id={session.id}"
        self._send(200, b"", {"Location": location})

    def _chunk(self, query, fault, upload_id) -> None:
        crange = self.headers.get("Content-Range", "")
        with self.fake.lock:
            session = self.fake.sessions.get(upload_id)
        if fault and fault.kind == "expire":
            self._body()
            with self.fake.lock:
                self.fake.sessions.pop(upload_id, None)
            return self._error(fault.status, "notFound", "Upload session expired.")
        if session is None:
            self._body()
            return self._error(404, "notFound", "No such upload session.")
        m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", crange)
        if not m:
            self._body()
            return self._error(400, "badRequest", f"bad Content-Range {crange!r}")
        data = self._body()
        if len(data) < int(self.headers.get("Content-Length") or 0):
            with self.fake.lock:
                self.fake.short_bodies += 1
            return self._reset()
        with self.fake.lock:
            if m.group(3) != "*":
                session.total = int(m.group(3))
            if m.group(1) is not None:
                start = int(m.group(1))
                self.fake.chunk_bytes_received += len(data)
                have = len(session.data)
                if start > have:
                    return self._error(400, "badRequest", f"chunk starts at {start}, have {have}")
                self.fake.chunk_bytes_duplicated += min(len(data), have - start)
                session.data += data[have - start:]
            if session.done is None and session.total is not None and len(session.data) >= session.total:
                content = bytes(session.data[:session.total])
                if fault and fault.kind == "corrupt":
                    content = _corrupt(content)
                if session.file_id is None and session.metadata.get("id") in self.fake.files:
                    return self._error(409, "duplicate", "A file already exists with the provided ID.")
                session.done = self.fake._store(session.metadata, content, session.file_id)
            done, have = session.done, len(session.data)
        if done is not None:
            return self._send(200, done)
        self._send(308, b"", {"Range": f"bytes=0-{have - 1}"} if have else None)


def _corrupt(data: bytes) -> bytes:
    """Flip one byte in the middle (the stored copy no longer matches the client's md5)."""
    if not data:
        return data
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)
