"""A Drive-v3-compatible fake over HTTPS on 127.0.0.1, with faults injected on demand.

Implements what the sync Drive backend (and the real google-api-python-client) use: files.create (metadata,
multipart, resumable), files.list with q, files.get (metadata and alt=media with Range), files.update (metadata
and media), files.delete, files.generateIds, and an OAuth token endpoint. Bearer tokens are checked.

It models the real Drive where our client could get it wrong; each rule cites its reference (REF_* below):
DISCOVERY is the drive.v3.json discovery document shipped in googleapiclient/discovery_cache/documents/.
  * appProperties are private to the OAuth client that set them; `properties` are public     [APP_PROPERTIES]
  * the grant's scope: with drive.file only files this client created are visible              [DRIVE_FILE]
  * a refresh may not ask for a scope the grant lacks (invalid_scope)                          [RFC6749_6]
  * `fields` masks are honoured: a field not asked for is absent; defaults are minimal         [FIELDS]
  * shared-drive items need supportsAllDrives (and includeItemsFromAllDrives to be listed);
    deleting there needs the organizer role                                                     [SHARED, DELETE]
  * non-final resumable chunks must be multiples of 256 KiB                                     [CHUNKS]
  * a chunk may be acknowledged only in part (308 with a shorter Range)                         [PARTIAL]
  * files.list order is unspecified without orderBy: results are shuffled                      [ORDER]
  * files.list returns trashed files unless the query excludes them; trash counts against
    the storage quota; files.delete bypasses the trash                                          [TRASH, DELETE]
  * error bodies have Drive's shape: errors[] of {domain, reason, message}, code and message, and no
    status or details[] (a fault may ask for the newer AIP-193 shape, which other Google APIs send) [ERRORS]
  * a property's key plus value may hold at most 124 bytes of UTF-8                           [PROPERTIES]
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import json
import random
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
FAULTS = ("429", "403-rate", "500", "503", "quota", "reset", "stall", "drop", "expire", "corrupt", "401",
          "http", "partial")
DRIVE = "https://www.googleapis.com/auth/drive"
DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"
CHUNK_UNIT = 256 * 1024

REF_APP_PROPERTIES = ("DISCOVERY schemas.File.appProperties: 'private to the requesting app'; "
                      "schemas.File.properties: 'visible to all apps'")
REF_DRIVE_FILE = ("https://developers.google.com/drive/api/guides/api-specific-auth: drive.file = 'Create new Drive "
                  "files, or modify existing files, that you open with an app or that the user shares with an app'")
REF_RFC6749_6 = ("RFC 6749 section 6 (cited by google/oauth2/_client.py refresh_grant): the requested scope 'MUST "
                 "NOT include any scope not originally granted by the resource owner' -> invalid_scope")
REF_FIELDS = ("DISCOVERY parameters.fields: 'Selector specifying which fields to include in a partial response'; "
              "https://developers.google.com/drive/api/guides/fields-parameter (v3 returns a default subset)")
REF_SHARED = ("https://developers.google.com/workspace/drive/api/guides/enable-shareddrives: 'include the "
              "supportsAllDrives=true query parameter' for files.get/list/create/update/delete; "
              "DISCOVERY files.list includeItemsFromAllDrives, corpora, driveId")
REF_DELETE = ("DISCOVERY files.delete: 'Permanently deletes a file ... without moving it to the trash ... If the "
              "file belongs to a shared drive, the user must be an organizer on the parent folder'")
REF_CHUNKS = ("https://developers.google.com/drive/api/guides/manage-uploads#resumable: 'Create chunks in multiples "
              "of 256 KB (256 x 1024 bytes) in size, except for the final chunk'")
REF_PARTIAL = ("manage-uploads#resumable ('Resume an interrupted upload': continue from the Range the server "
               "reports); googleapiclient/http.py HttpRequest._process_response reads progress from the 308 Range")
REF_ORDER = "DISCOVERY files.list orderBy: the order is only defined by the sort keys given"
REF_TRASH = ("DISCOVERY files.list: 'This method returns *all* files by default, including trashed files'; "
             "schemas.About.storageQuota.usageInDriveTrash (trashed files use quota)")
REF_ERRORS = ("https://developers.google.com/drive/api/guides/handle-errors: every JSON sample is "
              "{'error': {'errors': [{'domain', 'reason', 'message'}], 'code', 'message'}} (domain 'usageLimits' "
              "for the limits, 'global' otherwise); the AIP-193 shape (error.status, details[] ErrorInfo.reason) "
              "is https://cloud.google.com/apis/design/errors")
REF_PROPERTIES = ("https://developers.google.com/drive/api/guides/properties, 'Limits of custom file properties': "
                  "'Maximum of 124 bytes size per property (including both key and value) in UTF-8 encoding'")
USAGE_LIMITS = {"rateLimitExceeded", "userRateLimitExceeded", "dailyLimitExceeded", "quotaExceeded",
                "storageQuotaExceeded", "sharingRateLimitExceeded"}  # their domain is usageLimits [REF_ERRORS]
PROPERTY_BYTES = 124
STORAGE_FULL = "The user's Drive storage quota has been exceeded."  # [REF_ERRORS] storageQuotaExceeded


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
    reason: str = ""
    message: str = ""  # an "http" fault's error message (default: "injected STATUS REASON")
    new_format_only: bool = False  # the error body has only error.status + details (AIP-193), no errors[]
    hits: int = 0

    @property
    def fired(self) -> int:
        """How often the fault acted (requests it skipped do not count)."""
        return max(0, self.hits - self.skip)


@dataclass
class Grant:
    """Who an access token speaks for: the OAuth client (apps are told apart by it) and the granted scopes."""
    client: str
    scopes: frozenset[str]


@dataclass
class Session:
    """A resumable upload session."""
    id: str
    metadata: dict
    file_id: str | None  # set for files.update uploads
    total: int | None
    query: dict = field(default_factory=dict)  # the start request's parameters (fields, supportsAllDrives)
    client: str = ""
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
        self.tokens: dict[str, Grant] = {}
        self.refresh_scopes: dict[str, frozenset[str]] = {}  # refresh token -> scopes granted (default: drive)
        self.organizers: set[tuple[str, str]] = set()  # (shared drive id, client) allowed to delete there
        self.storage_limit: int | None = None  # bytes of the account's quota, trashed files included
        self.log: list[tuple[str, str, str]] = []  # (category, method, path)
        self.token_requests = 0
        self.sessions_started = 0
        self.chunk_bytes_received = 0  # every byte of every upload chunk body, re-sent ones included
        self.chunk_bytes_duplicated = 0  # bytes received again for offsets already stored
        self.short_bodies = 0  # requests whose body was shorter than their Content-Length (a consumed stream)
        self.stopping = threading.Event()
        self.listing_lags = False  # while True, new files stay out of files.list results (search index lag)
        self.unindexed: set[str] = set()
        self.cursors: dict[str, list[str]] = {}  # page token -> ids still to return
        self._ids = itertools.count(1)
        self.files["root"] = {"id": "root", "name": "My Drive", "mimeType": FOLDER_MIME, "parents": [],
                              "trashed": False, "appProperties": {}, "properties": {}, "createdTime": _now(),
                              "modifiedTime": _now(), "creator": ""}

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

    def unfired(self) -> list[Fault]:
        """Injected faults that never acted: a test that injected them did not test what it meant to."""
        with self.lock:
            return [f for f in self.faults if f.fired == 0]

    def revoke_tokens(self) -> None:
        """Make every issued access token invalid (the client must refresh at the token endpoint)."""
        with self.lock:
            self.tokens.clear()

    def add_shared_drive(self, name: str, organizers: tuple[str, ...] = ()) -> dict:
        """A shared drive (its root folder's id is the driveId); organizers (client ids) may delete in it."""
        with self.lock:
            res = self._store({"name": name, "mimeType": FOLDER_MIME, "parents": []}, None, None, creator="")
            res["driveId"] = res["id"]
            self.organizers.update((res["id"], c) for c in organizers)
            return res

    def usage(self) -> int:
        """Bytes stored by the account, trashed files included [REF_TRASH]."""
        with self.lock:
            return sum(int(f.get("size", 0)) for f in self.files.values())

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

    def add_file(self, name: str, data: bytes, parent: str = "root", mime: str | None = None,
                 created: str | None = None) -> dict:
        """Put a file straight into the fake (for tests that prepare a remote)."""
        with self.lock:
            meta = {"name": name, "parents": [parent]} | ({"mimeType": mime} if mime else {})
            res = self._store(meta, None if mime == FOLDER_MIME else data, None, creator="")
            if created:
                res["createdTime"] = created
            return res

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

    def _store(self, meta: dict, data: bytes | None, file_id: str | None, creator: str) -> dict:
        """Create (file_id None) or update a file with metadata and optional content; return the stored resource.

        appProperties are stored per OAuth client (creator = the requesting client) [REF_APP_PROPERTIES]."""
        now = _now()
        if file_id is None:
            file_id = meta.get("id") or self.new_id()
            parents = list(meta["parents"]) if "parents" in meta else ["root"]  # [] = a shared drive's root
            res = {"id": file_id, "name": "Untitled", "mimeType": "application/octet-stream", "parents": parents,
                   "trashed": False, "appProperties": {}, "properties": {}, "createdTime": now, "creator": creator}
            parent = self.files.get(parents[0]) if parents else None
            if parent is not None and parent.get("driveId"):
                res["driveId"] = parent["driveId"]
            self.files[file_id] = res
            if self.listing_lags:
                self.unindexed.add(file_id)
        res = self.files[file_id]
        for key in ("name", "mimeType", "trashed"):
            if key in meta:
                res[key] = meta[key]
        private = res["appProperties"].setdefault(creator, {})
        for store, given in ((private, meta.get("appProperties")), (res["properties"], meta.get("properties"))):
            for k, v in (given or {}).items():
                if v is None:
                    store.pop(k, None)
                else:
                    store[k] = v
        res["modifiedTime"] = now
        if data is not None:
            self.content[file_id] = bytes(data)
            res["md5Checksum"] = hashlib.md5(data).hexdigest()
            res["size"] = str(len(data))
        return res


def _mask(fields: str) -> dict:
    """Parse a fields selector like 'nextPageToken,files(id,name)' into {name: submask or None} [REF_FIELDS]."""
    tokens = re.findall(r"[A-Za-z_*][A-Za-z0-9_]*|[(),]|\S", fields)

    def parse(i: int) -> tuple[dict, int]:
        mask = {}
        while i < len(tokens) and tokens[i] != ")":
            name = tokens[i]
            if not re.fullmatch(r"[A-Za-z_*][A-Za-z0-9_]*", name):
                raise ValueError(f"the fake does not parse {name!r} in fields={fields!r}")
            i += 1
            if i < len(tokens) and tokens[i] == "(":
                mask[name], i = parse(i + 1)
                i += 1  # the closing ")"
            else:
                mask[name] = None
            if i < len(tokens) and tokens[i] == ",":
                i += 1
        return mask, i
    return parse(0)[0]


def _apply_mask(resource: dict, mask: dict | None) -> dict:
    """The resource reduced to the fields in mask (None = all of it; '*' = all)."""
    if mask is None or "*" in mask:
        return resource
    out = {}
    for key, sub in mask.items():
        if key in resource:
            value = resource[key]
            if sub is not None and isinstance(value, list):
                value = [_apply_mask(v, sub) for v in value]
            elif sub is not None and isinstance(value, dict):
                value = _apply_mask(value, sub)
            out[key] = value
    return out


FILE_DEFAULT = {"kind": None, "id": None, "name": None, "mimeType": None}  # v3's default partial response
LIST_DEFAULT = {"kind": None, "nextPageToken": None, "incompleteSearch": None, "files": FILE_DEFAULT}


class _Reset(Exception):
    """Abort the connection with a TCP reset."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeDrive/1"
    # headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm holds the body until
    # the client's delayed ACK (about 40 ms) and every request took that long
    disable_nagle_algorithm = True

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

    GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                   409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}

    def _error(self, status: int, reason: str, message: str, headers: dict | None = None,
               new_format_only: bool = False) -> None:
        """An error body as Drive sends it: errors[] of {domain, reason, message}, code and message, no status
        and no details [REF_ERRORS]; new_format_only: the AIP-193 shape instead (status, details[] ErrorInfo)."""
        if new_format_only:
            error = {"code": status, "message": message, "status": self.GRPC_STATUS.get(status, "UNKNOWN"),
                     "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                                  "domain": "googleapis.com"}]}
        else:
            domain = "usageLimits" if reason in USAGE_LIMITS else "global"
            error = {"errors": [{"domain": domain, "reason": reason, "message": message}], "code": status,
                     "message": message}
        self._send(status, {"error": error}, headers)

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
        if fault.kind in ("expire", "corrupt", "partial"):
            return False
        if fault.kind == "reset":
            if not body_read:
                self._body(partial=True)
            self._reset()
        if not body_read:
            self._body()
        if fault.kind == "429":
            self._error(429, "rateLimitExceeded", "Rate Limit Exceeded",
                        {"Retry-After": fault.retry_after} if fault.retry_after else None)
        elif fault.kind == "403-rate":
            self._error(403, "userRateLimitExceeded", "User Rate Limit Exceeded")
        elif fault.kind == "quota":
            self._error(403, "storageQuotaExceeded", STORAGE_FULL)
        elif fault.kind == "401":
            self._error(401, "authError", "Invalid Credentials")
        elif fault.kind == "http":
            self._error(fault.status, fault.reason, fault.message or f"injected {fault.status} {fault.reason}",
                        {"Retry-After": fault.retry_after} if fault.retry_after else None,
                        new_format_only=fault.new_format_only)
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
            self.grant = self._grant()
            if self.grant is None:
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
        except Exception as e:  # a request the fake cannot handle: a permanent error, never a silent retry
            self.close_connection = True
            self._error(400, "fakeDriveUnsupported", f"{type(e).__name__}: {e}")

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

    def _grant(self) -> Grant | None:
        auth = self.headers.get("Authorization", "")
        return self.fake.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    # ---- what the caller may see, and how it sees it --------------------------------------------------------
    def _visible(self, res: dict, query: dict) -> bool:
        """Visible to this grant: drive.file sees only its own client's files [REF_DRIVE_FILE]; a shared-drive
        item only to callers that say supportsAllDrives=true [REF_SHARED]."""
        if res.get("driveId") and query.get("supportsAllDrives") != "true":
            return False
        if DRIVE not in self.grant.scopes and res["id"] != "root":
            return DRIVE_FILE in self.grant.scopes and res.get("creator") == self.grant.client
        return True

    def _view(self, res: dict) -> dict:
        """The resource as this client sees it: its own appProperties only [REF_APP_PROPERTIES]."""
        out = {k: v for k, v in res.items() if k not in ("appProperties", "creator")}
        out["kind"] = "drive#file"
        mine = res["appProperties"].get(self.grant.client)
        if mine:
            out["appProperties"] = dict(mine)
        if not out.get("properties"):
            out.pop("properties", None)
        return out

    def _fields(self, query: dict, resource: dict, default: dict) -> dict:
        """Honour the fields mask; without one, v3's default subset [REF_FIELDS]."""
        return _apply_mask(resource, _mask(query["fields"]) if query.get("fields") else default)

    def _lookup(self, fid: str, query: dict) -> dict | None:
        res = self.fake.files.get(fid)
        return res if res is not None and self._visible(res, query) else None

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
        """OAuth token endpoint: refresh-token grants (the client is the form's client_id; the scopes are the
        refresh token's grant) and service-account JWT grants (the client is the JWT issuer)."""
        form = dict(urllib.parse.parse_qsl(self._body().decode()))
        with self.fake.lock:
            self.fake.token_requests += 1
            fault = self.fake.take_fault("token")
        if fault and self._apply_fault(fault, body_read=True):
            return
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            granted = self.fake.refresh_scopes.get(form.get("refresh_token", ""), frozenset({DRIVE}))
            asked = frozenset(form.get("scope", "").split())
            if asked - granted:  # [REF_RFC6749_6]
                return self._send(400, {"error": "invalid_scope",
                                        "error_description": "scope not granted to this refresh token"})
            grant = Grant(form.get("client_id", ""), asked or granted)
        elif grant_type == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            claims = _jwt_claims(form.get("assertion", ""))
            grant = Grant(claims.get("iss", ""), frozenset(str(claims.get("scope", "")).split()))
        else:
            return self._send(400, {"error": "unsupported_grant_type"})
        token = f"fake-access-{uuid.uuid4().hex}"
        with self.fake.lock:
            self.fake.tokens[token] = grant
        self._send(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer",
                         "scope": " ".join(sorted(grant.scopes))})

    def _generate_ids(self, query, fault) -> None:
        count = int(query.get("count", 10))
        ids = [self.fake.new_id() for _ in range(count)]
        with self.fake.lock:
            self.fake.generated.update(ids)
        self._send(200, {"kind": "drive#generatedIds", "space": "drive", "ids": ids})

    def _list(self, query, fault) -> None:
        """files.list: trashed files included unless q excludes them [REF_TRASH]; shared-drive items only with
        includeItemsFromAllDrives and supportsAllDrives [REF_SHARED]; order unspecified: shuffled [REF_ORDER]."""
        if query.get("includeItemsFromAllDrives") == "true" and query.get("supportsAllDrives") != "true":
            return self._error(403, "teamDrivesSupportRequired",
                               "includeItemsFromAllDrives can only be set when supportsAllDrives is true.")
        token = query.get("pageToken")
        if token:
            with self.fake.lock:
                remaining = self.fake.cursors.pop(token, None)
            if remaining is None:
                return self._error(400, "invalid", "Invalid page token.")
        else:
            try:
                pred = parse(query.get("q", ""))
            except QueryError as e:
                return self._error(400, "invalidQuery", str(e))
            all_drives = query.get("includeItemsFromAllDrives") == "true"
            with self.fake.lock:
                remaining = [f["id"] for f in self.fake.files.values()
                             if f["id"] != "root" and f["id"] not in self.fake.unindexed
                             and (all_drives or not f.get("driveId")) and self._visible(f, query)
                             and pred(self._view(f))]
            random.shuffle(remaining)
        size = min(int(query.get("pageSize", 100)), 1000)
        with self.fake.lock:
            files = [self._view(self.fake.files[i]) for i in remaining[:size] if i in self.fake.files]
            page = {"kind": "drive#fileList", "incompleteSearch": False, "files": files}
            if len(remaining) > size:
                page["nextPageToken"] = uuid.uuid4().hex
                self.fake.cursors[page["nextPageToken"]] = remaining[size:]
        self._send(200, self._fields(query, page, LIST_DEFAULT))

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

    def _check_properties(self, meta: dict) -> bool:
        """Refuse a property whose key plus value exceeds 124 bytes of UTF-8 (400 badRequest) [REF_PROPERTIES]."""
        for field_name in ("properties", "appProperties"):
            for key, value in (meta.get(field_name) or {}).items():
                if len(key.encode("utf-8")) + len((value or "").encode("utf-8")) > PROPERTY_BYTES:
                    self._error(400, "badRequest", f"The property {key!r} exceeds the {PROPERTY_BYTES}-byte limit.")
                    return False
        return True

    def _check_parents(self, meta: dict, query: dict) -> bool:
        """The parent must exist and be visible (a shared-drive parent needs supportsAllDrives) [REF_SHARED]."""
        for parent in meta.get("parents") or ["root"]:
            if self._lookup(parent, query) is None:
                self._error(404, "notFound", f"File not found: {parent}.")
                return False
        return True

    def _create_metadata(self, query, fault) -> None:
        meta = json.loads(self._body() or b"{}")
        with self.fake.lock:
            if not self._check_properties(meta) or not self._check_new_id(meta) or not self._check_parents(meta, query):
                return
            res = self.fake._store(meta, None, None, self.grant.client)
            view = self._view(res)
        self._send(200, self._fields(query, view, FILE_DEFAULT))

    def _get(self, query, fault, fid) -> None:
        self._body()
        with self.fake.lock:
            res = self._lookup(fid, query)
            data = self.fake.content.get(fid, b"")
            view = self._view(res) if res is not None else None
        if res is None:
            return self._error(404, "notFound", f"File not found: {fid}.")
        if query.get("alt") != "media":
            return self._send(200, self._fields(query, view, FILE_DEFAULT))
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
            if self._lookup(fid, query) is None:
                return self._error(404, "notFound", f"File not found: {fid}.")
            if not self._check_properties(meta):
                return
            view = self._view(self.fake._store(meta, None, fid, self.grant.client))
        self._send(200, self._fields(query, view, FILE_DEFAULT))

    def _delete(self, query, fault, fid) -> None:
        """Permanent delete (no trash); in a shared drive only an organizer may [REF_DELETE]."""
        self._body()
        with self.fake.lock:
            res = self._lookup(fid, query)
            if res is None:
                return self._error(404, "notFound", f"File not found: {fid}.")
            if res.get("driveId") and (res["driveId"], self.grant.client) not in self.fake.organizers:
                return self._error(403, "insufficientFilePermissions",
                                   "The user does not have sufficient permissions for this file.")
            del self.fake.files[fid]
            self.fake.content.pop(fid, None)
        self._send(204)

    def _over_quota(self, data: bytes, fid: str | None) -> bool:
        """Storage is checked against every stored byte, trashed files included [REF_TRASH]."""
        if self.fake.storage_limit is None:
            return False
        replaced = len(self.fake.content.get(fid, b"")) if fid else 0
        if self.fake.usage() - replaced + len(data) <= self.fake.storage_limit:
            return False
        self._error(403, "storageQuotaExceeded", STORAGE_FULL)
        return True

    def _multipart(self, query, fault, fid) -> None:
        body = self._body()
        boundary = re.search(r'boundary="?([^";]+)"?', self.headers.get("Content-Type", "")).group(1).encode()
        # googleapiclient writes the body with one line ending throughout (email's BytesGenerator, policy
        # compat32: "\n"; RFC 2046 says CRLF). It is read off the first delimiter line and only that exact
        # ending belongs to a delimiter: a payload that itself ends in "\r" must keep it.
        eol = b"\r\n" if body.startswith(b"--" + boundary + b"\r\n") else b"\n"
        pieces = (eol + body).split(eol + b"--" + boundary)  # "", part, part, "--" + epilogue
        parts = [piece.removeprefix(eol).partition(eol + eol)[2] for piece in pieces[1:-1]]
        meta, data = json.loads(parts[0] or b"{}"), parts[1]
        with self.fake.lock:
            if fid is None and (not self._check_new_id(meta) or not self._check_parents(meta, query)):
                return
            if fid is not None and self._lookup(fid, query) is None:
                return self._error(404, "notFound", f"File not found: {fid}.")
            if not self._check_properties(meta) or self._over_quota(data, fid):
                return
            if fault and fault.kind == "corrupt":
                data = _corrupt(data)
            view = self._view(self.fake._store(meta, data, fid, self.grant.client))
        self._send(200, self._fields(query, view, FILE_DEFAULT))

    def _start_resumable(self, query, fault, fid) -> None:
        meta = json.loads(self._body() or b"{}")
        with self.fake.lock:
            if fid is None and (not self._check_new_id(meta) or not self._check_parents(meta, query)):
                return
            if fid is not None and self._lookup(fid, query) is None:
                return self._error(404, "notFound", f"File not found: {fid}.")
            if not self._check_properties(meta):
                return
            total = self.headers.get("X-Upload-Content-Length")
            session = Session(uuid.uuid4().hex, meta, fid, int(total) if total else None,
                              query=dict(query), client=self.grant.client)
            self.fake.sessions[session.id] = session
            self.fake.sessions_started += 1
        base = "/upload/drive/v3/files" + (f"/{fid}" if fid else "")
        location = f"{self.fake.url.rstrip('/')}{base}?uploadType=resumable&upload_id={session.id}"
        self._send(200, b"", {"Location": location})

    def _chunk(self, query, fault, upload_id) -> None:
        """A resumable chunk: non-final chunks must be multiples of 256 KiB [REF_CHUNKS]; a 'partial' fault
        stores only part of it and says so in the 308 Range [REF_PARTIAL]."""
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
                final = session.total is not None and start + len(data) >= session.total
                if not final and len(data) % CHUNK_UNIT:
                    return self._error(400, "badRequest", f"chunk of {len(data)} bytes is not a multiple of "
                                                          f"{CHUNK_UNIT} (only the final chunk may be)")
                if fault and fault.kind == "partial" and len(data) > 1:
                    data = data[:len(data) // 2]
                self.fake.chunk_bytes_received += len(data)
                have = len(session.data)
                if start > have:
                    return self._error(400, "badRequest", f"chunk starts at {start}, have {have}")
                self.fake.chunk_bytes_duplicated += min(len(data), have - start)
                session.data += data[have - start:]
            if session.done is None and session.total is not None and len(session.data) >= session.total:
                content = bytes(session.data[:session.total])
                if self._over_quota(content, session.file_id):
                    return
                if fault and fault.kind == "corrupt":
                    content = _corrupt(content)
                if session.file_id is None and session.metadata.get("id") in self.fake.files:
                    return self._error(409, "duplicate", "A file already exists with the provided ID.")
                session.done = self._view(self.fake._store(session.metadata, content, session.file_id,
                                                           session.client))
            done, have = session.done, len(session.data)
        if done is not None:
            return self._send(200, self._fields(session.query, done, FILE_DEFAULT))
        self._send(308, b"", {"Range": f"bytes=0-{have - 1}"} if have else None)


def _jwt_claims(assertion: str) -> dict:
    """The (unverified) claims of a service-account JWT assertion."""
    try:
        payload = assertion.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}


def _corrupt(data: bytes) -> bytes:
    """Flip one byte in the middle (the stored copy no longer matches the client's md5)."""
    if not data:
        return data
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)
