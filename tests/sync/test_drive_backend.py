"""The Drive backend with the real google-api-python-client against the HTTPS fake Drive: faults and all."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from sync.backends import make_backend
from sync.errors import QuotaExceeded, SyncError, TransferError
from tests.sync.helpers import STALL_S, TRIES

CHUNK = 256 * 1024


@pytest.fixture
def backend(drive_config, tmp_path):
    return make_backend(drive_config, tmp_path / "state")


@pytest.fixture
def big(tmp_path):
    """A file of 3.5 chunks: uploaded resumably in four chunks."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * CHUNK + CHUNK // 2))
    return path


@pytest.fixture
def small(tmp_path):
    """A file below one chunk: uploaded in one multipart request."""
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(5000))
    return path


def exactly_one_verified_copy(fake, name, local):
    """The fake holds one live file called name, in runs/flowers, with local's exact content and md5."""
    files = fake.live_files(name)
    assert len(files) == 1, f"{len(files)} copies of {name}; requests: {fake.log}"
    data = fake.content[files[0]["id"]]
    assert data == local.read_bytes()
    assert files[0]["md5Checksum"] == hashlib.md5(data).hexdigest()
    assert fake.path_of(files[0]) == f"runs/flowers/{name}"
    return files[0]


def test_put_list_get_delete_round_trip_in_the_configured_folder(backend, fake_drive, big, small, tmp_path):
    backend.put("big.bin", big, {"kind": "snapshot", "step": "7"})
    backend.put("small.bin", small, {"kind": "cache"})
    exactly_one_verified_copy(fake_drive, "big.bin", big)
    exactly_one_verified_copy(fake_drive, "small.bin", small)
    listed = {f.name: f for f in backend.list()}
    assert set(listed) == {"big.bin", "small.bin"}
    assert listed["big.bin"].properties == {"kind": "snapshot", "step": "7"}
    assert listed["big.bin"].size == big.stat().st_size
    backend.get("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    backend.delete("big.bin")
    assert [f.name for f in backend.list()] == ["small.bin"]
    assert ("start", "POST", "/upload/drive/v3/files") in fake_drive.log  # resumable for the big one
    assert sum(1 for c, _, p in fake_drive.log if c == "create" and p.startswith("/upload")) == 1  # multipart


def test_putting_the_same_content_again_creates_no_duplicate_and_sends_no_bytes(backend, fake_drive, big):
    backend.put("big.bin", big, {"kind": "x"})
    received = fake_drive.chunk_bytes_received
    backend.put("big.bin", big, {"kind": "x"})
    assert fake_drive.chunk_bytes_received == received
    exactly_one_verified_copy(fake_drive, "big.bin", big)


def test_putting_new_content_under_a_name_replaces_it_in_place(backend, fake_drive, small, tmp_path):
    first = backend.put("latest.json", small, {"kind": "pointer"})
    small.write_bytes(b"new pointer")
    backend.put("latest.json", small, {"kind": "pointer"})
    assert exactly_one_verified_copy(fake_drive, "latest.json", small)
    assert first.name == "latest.json"


FAULTS = [("429", {"retry_after": "0"}), ("403-rate", {}), ("500", {}), ("503", {}), ("reset", {}),
          ("stall", {"seconds": STALL_S}), ("drop", {})]


@pytest.mark.parametrize("kind,kw", FAULTS, ids=[k for k, _ in FAULTS])
@pytest.mark.parametrize("on", ["chunk", "start", "status", "list", "generateIds"])
def test_resumable_upload_survives_the_fault_with_one_verified_copy(backend, fake_drive, big, kind, kw, on):
    if on == "status":  # the client asks the session's status only after a chunk got an error response (a
        fake_drive.inject("503", on="chunk", skip=1)  # reset may be retried by httplib2 itself, asking nothing)
    fake_drive.inject(kind, on=on, skip=1 if on == "chunk" else 0, **kw)
    backend.put("big.bin", big, {"kind": "snapshot"})
    exactly_one_verified_copy(fake_drive, "big.bin", big)
    lost_session_reply = on == "start" and kind in ("stall", "drop")  # the client never learnt the first session's URI
    assert fake_drive.sessions_started == (2 if lost_session_reply else 1)  # otherwise: the same session
    # a retried chunk is re-sent whole, never as an empty body (the consumed-stream pitfall)
    assert fake_drive.chunk_bytes_duplicated <= 2 * CHUNK
    assert fake_drive.short_bodies == 0


@pytest.mark.parametrize("kind,kw", FAULTS, ids=[k for k, _ in FAULTS])
def test_multipart_upload_survives_the_fault_with_one_copy(backend, fake_drive, small, kind, kw):
    fake_drive.inject(kind, on="create", **kw)
    backend.put("small.bin", small, {"kind": "cache"})
    exactly_one_verified_copy(fake_drive, "small.bin", small)


def test_multipart_upload_keeps_line_endings_inside_the_content(backend, fake_drive, tmp_path):
    """A payload ending in CR (1 random file in 256) once lost it: the part ends only at the client's own
    line ending before the delimiter (googleapiclient writes "\n" throughout)."""
    path = tmp_path / "endings.bin"
    path.write_bytes(b"\r\n--not-a-boundary\r\n\r\nbinary\r\n\r")
    backend.put("endings.bin", path, {"kind": "cache"})
    exactly_one_verified_copy(fake_drive, "endings.bin", path)


def test_lost_response_to_a_create_leaves_no_duplicate(backend, fake_drive, small):
    """The file is stored but the response never arrives: the retry with the same pre-generated id gets 409."""
    fake_drive.inject("stall", on="create", seconds=STALL_S)  # multipart create stores, then stalls
    backend.put("small.bin", small, {"kind": "cache"})
    exactly_one_verified_copy(fake_drive, "small.bin", small)
    assert sum(1 for c, _, p in fake_drive.log if c == "create" and p.startswith("/upload")) == 2


def test_lost_response_to_a_folder_create_leaves_one_folder(backend, fake_drive, small):
    fake_drive.inject("stall", on="create-meta", seconds=STALL_S)
    backend.put("small.bin", small, {"kind": "cache"})
    folders = [f for f in fake_drive.files.values() if f["name"] == "runs"]
    assert len(folders) == 1
    assert sum(1 for c, _, _ in fake_drive.log if c == "create-meta") == 3  # runs (twice), flowers


def test_lost_response_to_the_last_chunk_leaves_no_duplicate(backend, fake_drive, big):
    fake_drive.inject("stall", on="chunk", skip=3, seconds=STALL_S)  # the 4th (last) chunk completes the file
    backend.put("big.bin", big, {"kind": "x"})
    exactly_one_verified_copy(fake_drive, "big.bin", big)
    assert fake_drive.sessions_started == 1


@pytest.mark.parametrize("status", [404, 410])
def test_expired_upload_session_starts_a_new_one(backend, fake_drive, big, status):
    fake_drive.inject("expire", on="chunk", skip=2, status=status)
    backend.put("big.bin", big, {"kind": "x"})
    exactly_one_verified_copy(fake_drive, "big.bin", big)
    assert fake_drive.sessions_started == 2


@pytest.mark.parametrize("on,fixture", [("chunk", "big"), ("create", "small")])
def test_corrupted_byte_is_caught_by_md5_and_uploaded_again(backend, fake_drive, on, fixture, request):
    local = request.getfixturevalue(fixture)
    fake_drive.inject("corrupt", on=on)
    backend.put("f.bin", local, {"kind": "x"})
    exactly_one_verified_copy(fake_drive, "f.bin", local)


def test_corruption_every_time_ends_in_a_clear_error(backend, fake_drive, small):
    fake_drive.inject("corrupt", on="create", times=100)
    with pytest.raises(SyncError, match="md5 mismatch"):
        backend.put("f.bin", small, {"kind": "x"})


def test_quota_exceeded_is_a_clear_error_that_says_what_to_do(backend, fake_drive, big):
    fake_drive.inject("quota", on="start")
    with pytest.raises(QuotaExceeded, match="prune.*shared drive.*user credentials"):
        backend.put("big.bin", big, {"kind": "x"})
    assert fake_drive.live_files("big.bin") == []


def test_a_server_that_keeps_failing_gives_up_after_the_configured_tries(backend, fake_drive, big):
    fault = fake_drive.inject("503", on="chunk", times=1000)
    with pytest.raises(TransferError, match=f"failed after {TRIES} tries"):
        backend.put("big.bin", big, {"kind": "x"})
    assert fault.hits == TRIES  # every try of the first chunk
    assert sum(1 for c, _, _ in fake_drive.log if c == "status") == TRIES - 1  # each retry asks the session first
    assert fake_drive.live_files("big.bin") == []


def test_download_resumes_through_resets_and_server_errors(backend, fake_drive, big, tmp_path):
    backend.put("big.bin", big, {"kind": "x"})
    # the fake gives each request to the first fault still due: the second chunk meets all three in turn
    faults = [fake_drive.inject("reset", on="media", skip=1), fake_drive.inject("500", on="media"),
              fake_drive.inject("stall", on="media", seconds=STALL_S)]
    backend.get("big.bin", tmp_path / "back.bin")
    assert [f.fired for f in faults] == [1, 1, 1]
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    ranged = [c for c, _, _ in fake_drive.log if c == "media"]
    assert len(ranged) >= 4  # chunked by Range, not one big GET


def test_expired_access_token_is_refreshed_at_the_credentials_files_token_uri(backend, fake_drive, small):
    backend.put("a.bin", small, {"kind": "x"})
    assert fake_drive.token_requests == 1
    fake_drive.revoke_tokens()
    backend.put("b.bin", small, {"kind": "x"})
    assert fake_drive.token_requests == 2
    exactly_one_verified_copy(fake_drive, "b.bin", small)


def test_refused_credentials_give_a_clear_error_without_secrets(backend, fake_drive, small, caplog):
    fake_drive.inject("401", on="token", times=10)
    with pytest.raises(SyncError) as info:
        backend.put("a.bin", small, {"kind": "x"})
    assert "credentials" in str(info.value)
    for secret in ("r3fr3sh-t0ken", "s3cr3t-client", "fake-access-"):
        assert secret not in str(info.value) and secret not in caplog.text


def test_folder_given_by_id_is_used_as_is(drive_config, fake_drive, small, tmp_path):
    folder = fake_drive.add_file("shared", b"", mime="application/vnd.google-apps.folder")
    drive_config.folder = f"id:{folder['id']}"
    make_backend(drive_config, tmp_path / "s").put("a.bin", small, {"kind": "x"})
    assert fake_drive.path_of(fake_drive.live_files("a.bin")[0]) == "shared/a.bin"


def test_unknown_folder_id_names_the_setting(drive_config, fake_drive, small, tmp_path):
    drive_config.folder = "id:nope"
    with pytest.raises(SyncError, match="sync.folder = 'id:nope'"):
        make_backend(drive_config, tmp_path / "s").put("a.bin", small, {"kind": "x"})


def test_listing_follows_pages(backend, fake_drive, tmp_path):
    backend.put("first.bin", tmp_path.joinpath("x").write_bytes(b"x") and tmp_path / "x", {"kind": "x"})
    parent = fake_drive.live_files("first.bin")[0]["parents"][0]
    for i in range(1005):
        fake_drive.add_file(f"f{i}", b"", parent=parent)
    assert len(backend.list()) == 1006


def service_account_file(tmp_path, fake):
    """A service-account JSON with a fresh RSA key whose token_uri is the fake's."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps({"type": "service_account", "project_id": "p", "private_key_id": "k1",
                              "private_key": pem, "client_email": "sa@p.iam.gserviceaccount.com",
                              "client_id": "1", "token_uri": fake.token_uri}), encoding="utf-8")
    return sa


def test_service_account_credentials_warn_about_storage_quota(drive_config, fake_drive, small, tmp_path, caplog):
    drive_config.credentials = str(service_account_file(tmp_path, fake_drive))
    make_backend(drive_config, tmp_path / "s").put("a.bin", small, {"kind": "x"})
    exactly_one_verified_copy(fake_drive, "a.bin", small)
    assert "no Drive storage of its own" in caplog.text and "shared drive" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_api_endpoint_is_the_api_root_and_a_drive_v3_base_is_accepted_too():
    from sync.backends.google_http import drive_base_url
    assert drive_base_url("") is None
    assert drive_base_url("https://h:1") == "https://h:1/drive/v3/"
    assert drive_base_url("https://h:1/drive/v3/") == "https://h:1/drive/v3/"


def test_download_continues_from_a_partial_file_left_by_a_killed_process(backend, fake_drive, big, tmp_path):
    backend.put("big.bin", big, {"kind": "x"})
    md5 = fake_drive.live_files("big.bin")[0]["md5Checksum"]
    dest = tmp_path / "back.bin"
    dest.with_name(f"back.bin.{md5[:12]}.partial").write_bytes(big.read_bytes()[:3 * CHUNK])
    before = sum(1 for c, _, _ in fake_drive.log if c == "media")
    backend.get("big.bin", dest)
    assert dest.read_bytes() == big.read_bytes()
    assert sum(1 for c, _, _ in fake_drive.log if c == "media") - before == 1  # only the last half chunk


def test_no_credentials_at_all_says_how_to_authenticate(drive_config, tmp_path, monkeypatch):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))  # no application-default file
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # not on Google Compute Engine
    drive_config.credentials = ""
    with pytest.raises(SyncError, match=r"no Google credentials were found.*authenticate_user\(\).*sync.credentials"):
        make_backend(drive_config, tmp_path / "s")


def test_credentials_file_of_the_wrong_kind_names_the_setting(drive_config, tmp_path):
    bad = tmp_path / "client_secret.json"
    bad.write_text(json.dumps({"installed": {"client_id": "x"}}))
    drive_config.credentials = str(bad)
    with pytest.raises(SyncError, match="sync.credentials = .*'authorized_user' or 'service_account'"):
        make_backend(drive_config, tmp_path / "s")
