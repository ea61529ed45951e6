"""The fake Drive behaves like the real one where a client can get it wrong; each rule cites its reference
(tests/fake_drive/server.py REF_*), and each is checked here with raw HTTP, not through our backend."""
from __future__ import annotations

import json
import urllib.parse

import httplib2
import pytest

from tests.fake_drive.server import CHUNK_UNIT, DRIVE, DRIVE_FILE


class Client:
    """Raw Drive v3 HTTP calls as one OAuth client (its token comes from the fake's token endpoint)."""

    def __init__(self, fake, client_id: str, scope: str = DRIVE):
        self.fake, self.http = fake, httplib2.Http(ca_certs=str(fake.cert))
        self.http.redirect_codes = self.http.redirect_codes - {308}
        fake.refresh_scopes[f"rt-{client_id}"] = frozenset({scope})
        resp, body = self.http.request(fake.token_uri, "POST", urllib.parse.urlencode(
            {"grant_type": "refresh_token", "refresh_token": f"rt-{client_id}", "client_id": client_id}),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert resp.status == 200, body
        self.token = json.loads(body)["access_token"]

    def call(self, method: str, path: str, body=None, headers=None, **params):
        url = f"{self.fake.url}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body) if isinstance(body, dict) else body
        resp, content = self.http.request(url, method, data, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json", **(headers or {})})
        return resp.status, (json.loads(content) if content and content[:1] in b"{[" else content), resp

    def create(self, body: dict, **params) -> dict:
        status, res, _ = self.call("POST", "drive/v3/files", body, fields="*", **params)
        assert status == 200, res
        return res


def test_app_properties_are_private_to_the_client_and_properties_are_public(fake_drive):
    """REF_APP_PROPERTIES."""
    a, b = Client(fake_drive, "app-a"), Client(fake_drive, "app-b")
    fid = a.create({"name": "x", "appProperties": {"k": "a"}, "properties": {"p": "public"}})["id"]
    _, seen_by_a, _ = a.call("GET", f"drive/v3/files/{fid}", fields="appProperties,properties")
    _, seen_by_b, _ = b.call("GET", f"drive/v3/files/{fid}", fields="appProperties,properties")
    assert seen_by_a == {"appProperties": {"k": "a"}, "properties": {"p": "public"}}
    assert seen_by_b == {"properties": {"p": "public"}}


def test_drive_file_scope_sees_only_the_files_its_client_created(fake_drive):
    """REF_DRIVE_FILE."""
    full, narrow = Client(fake_drive, "app-a"), Client(fake_drive, "app-b", scope=DRIVE_FILE)
    theirs = full.create({"name": "theirs"})["id"]
    mine = narrow.create({"name": "mine"})["id"]
    assert narrow.call("GET", f"drive/v3/files/{theirs}")[0] == 404
    _, listed, _ = narrow.call("GET", "drive/v3/files", q="trashed = false")
    assert [f["id"] for f in listed["files"]] == [mine]


def test_a_refresh_may_not_ask_for_a_scope_the_grant_lacks(fake_drive):
    """REF_RFC6749_6."""
    fake_drive.refresh_scopes["rt"] = frozenset({DRIVE_FILE})
    resp, body = httplib2.Http(ca_certs=str(fake_drive.cert)).request(
        fake_drive.token_uri, "POST", urllib.parse.urlencode(
            {"grant_type": "refresh_token", "refresh_token": "rt", "client_id": "c", "scope": DRIVE}),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 400 and json.loads(body)["error"] == "invalid_scope"


def test_fields_masks_are_honoured_and_the_default_is_minimal(fake_drive):
    """REF_FIELDS."""
    a = Client(fake_drive, "app-a")
    fid = a.create({"name": "x", "properties": {"p": "1"}})["id"]
    assert set(a.call("GET", f"drive/v3/files/{fid}")[1]) == {"kind", "id", "name", "mimeType"}
    assert a.call("GET", f"drive/v3/files/{fid}", fields="id,properties")[1] == {"id": fid, "properties": {"p": "1"}}
    _, page, _ = a.call("GET", "drive/v3/files", fields="files(name)")
    assert page == {"files": [{"name": "x"}]}


def test_shared_drive_items_need_the_all_drives_flags_and_deleting_needs_an_organizer(fake_drive):
    """REF_SHARED, REF_DELETE."""
    a, org = Client(fake_drive, "app-a"), Client(fake_drive, "organizer")
    drive = fake_drive.add_shared_drive("team", organizers=("organizer",))
    assert a.call("POST", "drive/v3/files", {"name": "x", "parents": [drive["id"]]})[0] == 404
    fid = a.create({"name": "x", "parents": [drive["id"]]}, supportsAllDrives="true")["id"]
    assert fake_drive.files[fid]["driveId"] == drive["id"]
    assert a.call("GET", f"drive/v3/files/{fid}")[0] == 404
    assert a.call("GET", f"drive/v3/files/{fid}", supportsAllDrives="true")[0] == 200
    q = f"'{drive['id']}' in parents"
    assert a.call("GET", "drive/v3/files", q=q, supportsAllDrives="true")[1]["files"] == []
    assert a.call("GET", "drive/v3/files", q=q, includeItemsFromAllDrives="true")[0] == 403
    listed = a.call("GET", "drive/v3/files", q=q, supportsAllDrives="true", includeItemsFromAllDrives="true")[1]
    assert [f["id"] for f in listed["files"]] == [fid]
    status, body, _ = a.call("DELETE", f"drive/v3/files/{fid}", supportsAllDrives="true")
    assert status == 403 and body["error"]["errors"][0]["reason"] == "insufficientFilePermissions"
    assert org.call("DELETE", f"drive/v3/files/{fid}", supportsAllDrives="true")[0] == 204


def _session(client, total: int) -> str:
    status, _, resp = client.call("POST", "upload/drive/v3/files", {"name": "big"}, uploadType="resumable",
                                  headers={"X-Upload-Content-Length": str(total)})
    assert status == 200
    return resp["location"].removeprefix(client.fake.url)


def test_non_final_chunks_must_be_multiples_of_256_kib(fake_drive):
    """REF_CHUNKS."""
    a = Client(fake_drive, "app-a")
    total = 3 * CHUNK_UNIT
    uri = _session(a, total)
    bad = a.call("PUT", uri, b"x" * (CHUNK_UNIT + 1), {"Content-Range": f"bytes 0-{CHUNK_UNIT}/{total}"})
    assert bad[0] == 400
    good = a.call("PUT", uri, b"x" * CHUNK_UNIT, {"Content-Range": f"bytes 0-{CHUNK_UNIT - 1}/{total}"})
    assert good[0] == 308 and good[2]["range"] == f"bytes=0-{CHUNK_UNIT - 1}"
    last = a.call("PUT", uri, b"x" * (2 * CHUNK_UNIT), {"Content-Range": f"bytes {CHUNK_UNIT}-{total - 1}/{total}"})
    assert last[0] == 200


def test_a_chunk_can_be_acknowledged_only_in_part(fake_drive):
    """REF_PARTIAL."""
    a = Client(fake_drive, "app-a")
    uri = _session(a, 4 * CHUNK_UNIT)
    fake_drive.inject("partial", on="chunk")
    status, _, resp = a.call("PUT", uri, b"x" * (2 * CHUNK_UNIT),
                             {"Content-Range": f"bytes 0-{2 * CHUNK_UNIT - 1}/{4 * CHUNK_UNIT}"})
    assert status == 308 and resp["range"] == f"bytes=0-{CHUNK_UNIT - 1}"


def test_list_order_is_unspecified(fake_drive):
    """REF_ORDER: without orderBy the fake shuffles; a client that relies on order sees it change."""
    a = Client(fake_drive, "app-a")
    for i in range(8):
        a.create({"name": f"f{i}"})
    orders = {tuple(f["name"] for f in a.call("GET", "drive/v3/files", fields="files(name)")[1]["files"])
              for _ in range(6)}
    assert len(orders) > 1


def test_list_includes_trashed_files_unless_asked_not_to_and_trash_uses_quota(fake_drive):
    """REF_TRASH, REF_DELETE."""
    a = Client(fake_drive, "app-a")
    fid = a.create({"name": "old"})["id"]
    fake_drive.content[fid] = b"x" * 1000
    fake_drive.files[fid]["size"] = "1000"
    assert a.call("PATCH", f"drive/v3/files/{fid}", {"trashed": True})[0] == 200
    assert [f["id"] for f in a.call("GET", "drive/v3/files")[1]["files"]] == [fid]
    assert a.call("GET", "drive/v3/files", q="trashed = false")[1]["files"] == []
    assert fake_drive.usage() == 1000  # still counted while in the trash
    assert a.call("DELETE", f"drive/v3/files/{fid}")[0] == 204 and fake_drive.usage() == 0


@pytest.mark.parametrize("reason,domain", [("userRateLimitExceeded", "usageLimits"), ("notFound", "global")])
def test_error_bodies_have_the_shape_of_drives_guide_with_no_status_or_details(fake_drive, reason, domain):
    """REF_ERRORS: {'error': {'errors': [{'domain', 'reason', 'message'}], 'code', 'message'}}."""
    a = Client(fake_drive, "app-a")
    fault = fake_drive.inject("http", on="list", status=403, reason=reason, message="Some message")
    status, body, _ = a.call("GET", "drive/v3/files")
    assert status == 403 and fault.fired == 1
    assert body == {"error": {"errors": [{"domain": domain, "reason": reason, "message": "Some message"}],
                              "code": 403, "message": "Some message"}}


def test_a_fault_may_answer_in_the_aip_193_shape_other_google_apis_use(fake_drive):
    a = Client(fake_drive, "app-a")
    fake_drive.inject("http", on="list", status=403, reason="ACCESS_TOKEN_SCOPE_INSUFFICIENT", new_format_only=True)
    status, body, _ = a.call("GET", "drive/v3/files")
    error = body["error"]
    assert status == 403 and error["status"] == "PERMISSION_DENIED" and "errors" not in error
    assert error["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"


def test_a_property_over_124_bytes_of_key_and_value_is_refused(fake_drive):
    """REF_PROPERTIES: the limit counts UTF-8 bytes of key plus value."""
    a = Client(fake_drive, "app-a")
    fits = {"k": "é" * 61 + "x"}  # 1 + 122 + 1 = 124 bytes
    status, _, _ = a.call("POST", "drive/v3/files", json.dumps({"name": "a", "properties": fits}).encode())
    assert status == 200
    over = {"k": "é" * 62}  # 1 + 124 bytes
    status, body, _ = a.call("POST", "drive/v3/files", json.dumps({"name": "b", "properties": over}).encode())
    assert status == 400 and body["error"]["errors"][0]["reason"] == "badRequest"


def test_the_storage_quota_counts_every_stored_byte(fake_drive):
    a = Client(fake_drive, "app-a")
    fake_drive.storage_limit = 10
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{{\"name\": \"f\"}}\r\n--{boundary}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n{'x' * 11}\r\n--{boundary}--").encode()
    status, res, _ = a.call("POST", "upload/drive/v3/files", body, uploadType="multipart",
                            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'})
    assert status == 403 and res["error"]["errors"][0]["reason"] == "storageQuotaExceeded"
