"""The Drive backend does what Google's Drive guides say, against the HTTPS fake Drive: any 4xx during a
resumable upload starts a new session within the put's budget, storage refusals are told apart from request
limits by reason and message, properties over 124 bytes are refused before any request, and every message on
deleting in a shared drive names the same role."""
from __future__ import annotations

import os

import pytest

from common.errors import EXIT_USER_ERROR
from sync import open_sync
from sync.backends import make_backend
from sync.backends.drive import PUT_RECOVERIES
from sync.backends.google_http import DRIVE_FILE_SCOPE, DRIVE_SCOPE, load_credentials
from sync.errors import QuotaExceeded, RemoteError, SyncError, TransferError
from sync.retry import PERMANENT_ADVICE, SHARED_DRIVE_DELETE, SessionGone
from tests.sync.helpers import TRIES
from tests.sync.test_drive_backend import CHUNK, backend, big, exactly_one_verified_copy  # noqa: F401 (fixtures)

STORAGE_MESSAGE = "The user has exceeded their Drive storage quota"


@pytest.mark.parametrize("status,reason", [(400, "badRequest"), (403, "forbidden"), (404, "notFound"),
                                           (412, "conditionNotMet")])
def test_any_4xx_on_a_started_upload_session_starts_a_new_session(backend, fake_drive, big, status, reason):
    fault = fake_drive.inject("http", on="chunk", skip=1, status=status, reason=reason)
    backend.put("big.bin", big, {"kind": "x"})
    exactly_one_verified_copy(fake_drive, "big.bin", big)
    assert fault.fired == 1 and fake_drive.sessions_started == 2


def test_a_saved_session_that_drive_refuses_is_replaced_not_stuck(backend, fake_drive, big, drive_config, tmp_path):
    first = fake_drive.inject("503", on="chunk", skip=1, times=TRIES)  # the put gives up mid-way: session saved
    with pytest.raises(TransferError):
        backend.put("big.bin", big, {"kind": "x"})
    refused = fake_drive.inject("http", on="status", status=400, reason="badRequest")
    make_backend(drive_config, tmp_path / "state").put("big.bin", big, {"kind": "x"})  # a restarted process
    exactly_one_verified_copy(fake_drive, "big.bin", big)
    assert first.fired == TRIES and refused.fired == 1 and fake_drive.sessions_started == 2


def test_a_session_refused_every_time_stops_at_the_put_budget(backend, fake_drive, big):
    fault = fake_drive.inject("http", on="chunk", times=1000, status=403, reason="forbidden")
    with pytest.raises(SyncError, match=r"gave up after upload session gone 3 times.*HTTP 403, forbidden"):
        backend.put("big.bin", big, {"kind": "x"})
    assert fake_drive.sessions_started == fault.fired == PUT_RECOVERIES.attempts_of(SessionGone)


@pytest.mark.parametrize("reason,message,kind,advice", [
    ("storageQuotaExceeded", "The user's Drive storage quota has been exceeded.", QuotaExceeded, "no storage left"),
    ("quotaExceeded", STORAGE_MESSAGE, QuotaExceeded, "no storage left"),
    ("insufficientFilePermissions", "The user does not have sufficient permissions for this file.", RemoteError,
     "share sync.folder")])
def test_a_refusal_a_new_session_cannot_mend_is_reported_at_once(backend, fake_drive, big, reason, message, kind,
                                                                 advice):
    fault = fake_drive.inject("http", on="chunk", skip=3, times=1000, status=403, reason=reason, message=message)
    with pytest.raises(kind, match=advice) as info:
        backend.put("big.bin", big, {"kind": "x"})
    assert fault.fired == 1 and fake_drive.sessions_started == 1
    assert info.value.exit_status == EXIT_USER_ERROR


def test_quota_exceeded_with_a_storage_message_is_storage_not_the_network(backend, fake_drive, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    fault = fake_drive.inject("http", on="create", times=1000, status=403, reason="quotaExceeded",
                              message=STORAGE_MESSAGE)
    with pytest.raises(QuotaExceeded, match="prune") as info:
        backend.put("small.bin", small, {})
    assert fault.fired == 1 and "not answering" not in str(info.value)


def test_quota_exceeded_for_requests_is_retried_and_then_blamed_on_the_request_limits(backend, fake_drive,
                                                                                        tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    fault = fake_drive.inject("http", on="create", times=1000, status=403, reason="quotaExceeded",
                              message="Quota exceeded for quota metric 'Queries' and limit 'Queries per minute'")
    with pytest.raises(TransferError, match="request limits") as info:
        backend.put("small.bin", small, {})
    assert fault.fired == TRIES and "not answering" not in str(info.value)


def test_a_property_over_124_bytes_is_refused_before_any_request(backend, fake_drive, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x")
    with pytest.raises(SyncError, match=r"'note' of small\.bin holds 125 bytes.*at most 124") as info:
        backend.put("small.bin", small, {"note": "é" * 60 + "x"})  # 4 + 120 + 1 bytes of UTF-8
    assert fake_drive.log == [] and info.value.exit_status == EXIT_USER_ERROR
    backend.put("small.bin", small, {"note": "é" * 60})  # 124 bytes: fits
    assert fake_drive.live_files("small.bin")[0]["properties"] == {"note": "é" * 60}


def test_a_run_name_too_long_for_drive_is_refused_when_sync_opens(drive_config, fake_drive, tmp_path):
    run_id = "r" * 119  # run_id + 119 bytes = 125
    with pytest.raises(SyncError, match=r"'run_id'.*run directory \(run\.dir\).*at most 118 bytes") as info:
        open_sync(drive_config, tmp_path / "run", tmp_path / "cache", run_id)
    assert fake_drive.log == [] and info.value.exit_status == EXIT_USER_ERROR
    open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r" * 118).close(timeout=5)


def test_every_message_on_deleting_in_a_shared_drive_names_the_organizer_role():
    """drive.v3.json files.delete: 'the user must be an `organizer` on the parent folder' (Manager)."""
    assert "Manager role" in SHARED_DRIVE_DELETE and "organizer" in SHARED_DRIVE_DELETE
    permissions = next(a for r, a in PERMANENT_ADVICE if "insufficientFilePermissions" in r)
    assert SHARED_DRIVE_DELETE in permissions and "Content manager" not in permissions


def test_the_delete_refusal_in_a_shared_drive_names_the_same_role(drive_config, fake_drive, tmp_path):
    team = fake_drive.add_shared_drive("team")  # these credentials are not an organizer
    drive_config.folder = f"id:{team['id']}"
    backend = make_backend(drive_config, tmp_path / "s")
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    backend.put("f.bin", path, {})
    with pytest.raises(RemoteError) as info:
        backend.delete("f.bin")
    assert SHARED_DRIVE_DELETE in str(info.value)


def _metadata_server_credentials(monkeypatch):
    """google.auth.default() as on Colab after auth.authenticate_user(): unscoped metadata-server credentials."""
    import google.auth
    from google.auth import compute_engine
    monkeypatch.setattr(google.auth, "default", lambda **kw: (compute_engine.Credentials(), None))


@pytest.mark.parametrize("folder,scope", [("runs/flowers", DRIVE_FILE_SCOPE), ("id:0AbCdEf", DRIVE_SCOPE)])
def test_colabs_metadata_server_credentials_are_asked_for_the_narrowest_scope(monkeypatch, drive_config, folder,
                                                                               scope):
    _metadata_server_credentials(monkeypatch)
    drive_config.credentials, drive_config.folder = "", folder
    assert list(load_credentials(drive_config).scopes) == [scope]


@pytest.mark.parametrize("folder,scope", [("runs/flowers", DRIVE_FILE_SCOPE), ("id:{team}", DRIVE_SCOPE)])
def test_a_service_account_token_carries_the_narrowest_scope_that_reaches_the_folder(drive_config, fake_drive,
                                                                                     tmp_path, folder, scope):
    from tests.sync.test_drive_backend import service_account_file
    team = fake_drive.add_shared_drive("team")
    drive_config.credentials = str(service_account_file(tmp_path, fake_drive))
    drive_config.folder = folder.format(team=team["id"])
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    make_backend(drive_config, tmp_path / "s").put("f.bin", path, {})
    assert {g.scopes for g in fake_drive.tokens.values()} == {frozenset({scope})}


def test_the_notebook_form_and_the_docs_state_the_scope_the_code_requests():
    from pathlib import Path
    from sync.backends.google_http import scope_for
    repo = Path(__file__).resolve().parents[2]
    form = (repo / "notebooks" / "colab_quickstart.ipynb").read_text(encoding="utf-8")
    docs = (repo / "docs" / "sync.md").read_text(encoding="utf-8")
    narrow, full = scope_for("runs/flowers").rsplit("/", 1)[1], scope_for("id:x").rsplit("/", 1)[1]
    assert (narrow, full) == ("drive.file", "drive")
    assert f"scope `{narrow}`" in form and "grants access to your whole Drive" in form
    assert "sees only files it made" not in form
    assert "carries **full\n  Drive access**" in docs and f"`{narrow}` (path\n  folder) or `{full}` (`id:`)" in docs
