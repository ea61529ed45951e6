"""The Drive backend against the fake in real-Drive mode: other OAuth clients, scopes as Google issues
them, shared drives, duplicates, every error class, and ids that cannot be reused."""
from __future__ import annotations

import json
import os

import pytest

from sync import open_sync
from sync.backends import make_backend
from sync.errors import RemoteError, SyncError
from sync.remote import POINTER, list_snapshots
from tests.fake_drive.server import DRIVE, DRIVE_FILE, FOLDER_MIME
from tests.sync.conftest import credentials_file
from tests.sync.helpers import hand_over, write_cache, write_checkpoint

CHUNK = 256 * 1024


def _checkpoint(sync, step, acc=0.5, cache_files=()):
    files = write_checkpoint(sync.run_dir, step)
    sync.on_checkpoint(hand_over(step, files, acc, cache_files))
    return files


def _train_on_machine_a(drive_config, tmp_path, steps=(100, 200)):
    for step in steps:
        sync = open_sync(drive_config, tmp_path / "a/run", tmp_path / "a/cache", "flowers")
        shards = write_cache(tmp_path / "a/cache", [f"shard-{step}.npy"])
        _checkpoint(sync, step, acc=step / 1000, cache_files=shards)
        assert f"step {step} uploaded" in sync.close(timeout=60).message


def _folders(fake):
    return [f for f in fake.files.values() if f["mimeType"] == FOLDER_MIME and f["id"] != "root"]


def test_machine_b_with_another_oauth_client_lists_and_restores_what_machine_a_wrote(
        drive_config, other_machine_config, fake_drive, tmp_path):
    _train_on_machine_a(drive_config, tmp_path)
    b = open_sync(other_machine_config, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    snaps = list_snapshots(b.backend)
    assert [(s.step, s.val_accuracy) for s in snaps] == [(200, 0.2), (100, 0.1)]
    assert all(len(s.sha256) == 64 for s in snaps)  # public properties, readable by any app
    assert b.restore_latest() == 200
    assert (tmp_path / "b/cache/mobilenet_v2/shard-200.npy").read_bytes() == \
        (tmp_path / "a/cache/mobilenet_v2/shard-200.npy").read_bytes()
    b.close(timeout=5)


def test_snapshots_without_readable_properties_are_still_listed_and_restored(drive_config, other_machine_config,
                                                                              fake_drive, tmp_path):
    _train_on_machine_a(drive_config, tmp_path, steps=(100,))
    for f in fake_drive.live_files():  # as if written with appProperties by another app: nothing readable
        f["properties"] = {}
    b = open_sync(other_machine_config, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    assert [s.step for s in list_snapshots(b.backend)] == [100]
    fake_drive.files[fake_drive.live_files(POINTER)[0]["id"]]["trashed"] = True
    assert b.restore_latest() == 100  # found by name; the archive's own manifest is verified
    b.close(timeout=5)


def test_read_only_commands_never_create_a_folder(other_machine_config, fake_drive, tmp_path):
    b = open_sync(other_machine_config, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    assert list_snapshots(b.backend) == []
    assert b.restore_latest() is None
    b.close(timeout=5)
    assert _folders(fake_drive) == []


def test_drive_file_scope_on_machine_b_sees_nothing_and_creates_nothing(drive_config, fake_drive, tmp_path):
    _train_on_machine_a(drive_config, tmp_path, steps=(100,))
    before = len(_folders(fake_drive))
    fake_drive.refresh_scopes["narrow"] = frozenset({DRIVE_FILE})
    creds = credentials_file(tmp_path / "narrow.json", fake_drive, "narrow-app", "narrow", scopes=[DRIVE_FILE])
    import dataclasses
    narrow = dataclasses.replace(drive_config, credentials=str(creds))
    b = open_sync(narrow, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    assert b.restore_latest() is None
    b.close(timeout=5)
    assert len(_folders(fake_drive)) == before


def test_an_authorized_user_file_is_refreshed_with_its_own_grant_not_a_forced_scope(drive_config, fake_drive,
                                                                                  tmp_path):
    fake_drive.refresh_scopes["r3fr3sh-t0ken"] = frozenset({DRIVE})  # granted full Drive, as Colab's are
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    make_backend(drive_config, tmp_path / "s").put("f.bin", path, {})  # no invalid_scope on refresh
    assert {g.scopes for g in fake_drive.tokens.values()} == {frozenset({DRIVE})}


def test_default_credentials_get_no_forced_scope(monkeypatch, drive_config):
    import google.auth
    from sync.backends.google_http import load_credentials
    seen = {}

    class Creds:
        requires_scopes = False

    def default(**kw):
        seen.update(kw)
        return Creds(), None
    monkeypatch.setattr(google.auth, "default", default)
    drive_config.credentials = ""
    assert isinstance(load_credentials(drive_config), Creds) and "scopes" not in seen


def test_duplicate_folders_resolve_to_the_oldest_with_a_warning(drive_config, fake_drive, tmp_path, caplog):
    runs_new = fake_drive.add_file("runs", b"", mime=FOLDER_MIME, created="2026-01-02T00:00:00.000Z")
    runs_old = fake_drive.add_file("runs", b"", mime=FOLDER_MIME, created="2026-01-01T00:00:00.000Z")
    fake_drive.add_file("flowers", b"", parent=runs_new["id"], mime=FOLDER_MIME)
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    make_backend(drive_config, tmp_path / "s1").put("f.bin", path, {})
    make_backend(drive_config, tmp_path / "s2").put("g.bin", path, {})
    placed = {fake_drive.path_of(f): f["parents"][0] for f in fake_drive.live_files()}
    flowers_ids = {placed["runs/flowers/f.bin"], placed["runs/flowers/g.bin"]}
    assert len(flowers_ids) == 1 and fake_drive.files[flowers_ids.pop()]["parents"] == [runs_old["id"]]
    assert "Drive holds 2 items named folder 'runs'" in caplog.text and "using the oldest" in caplog.text


def test_duplicate_pointers_resolve_to_the_oldest(drive_config, fake_drive, tmp_path, caplog):
    _train_on_machine_a(drive_config, tmp_path, steps=(100,))
    [pointer] = fake_drive.live_files(POINTER)
    fake_drive.add_file(POINTER, b"{}", parent=pointer["parents"][0], created="2999-01-01T00:00:00.000Z")
    b = open_sync(drive_config, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    assert b.restore_latest() == 100  # the newer, broken duplicate is ignored
    assert f"items named {POINTER}" in caplog.text
    b.close(timeout=5)


def test_a_saved_file_id_that_drive_refuses_is_replaced_not_retried_forever(backend_state, drive_config,
                                                                          fake_drive, tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * CHUNK))
    taken = fake_drive.add_file("someone-else", b"")["id"]  # e.g. the id was used by an expired session's file
    from sync.snapshot import file_digest
    state = backend_state / "uploads" / "big.bin.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"file_id": taken, "md5": file_digest(path, "md5"), "size": 3 * CHUNK}))
    make_backend(drive_config, backend_state).put("big.bin", path, {})
    [stored] = fake_drive.live_files("big.bin")
    assert stored["id"] != taken and fake_drive.content[stored["id"]] == path.read_bytes()


@pytest.fixture
def backend_state(tmp_path):
    return tmp_path / "state"


def test_a_partly_acknowledged_chunk_is_continued_from_the_servers_range(drive_config, fake_drive, tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(4 * CHUNK + 100))
    drive_config.chunk_mib = 0.5
    fake_drive.inject("partial", on="chunk", times=2)
    make_backend(drive_config, tmp_path / "s").put("big.bin", path, {})
    [stored] = fake_drive.live_files("big.bin")
    assert fake_drive.content[stored["id"]] == path.read_bytes() and fake_drive.sessions_started == 1


def test_shared_drive_folder_gets_the_flags_on_every_call(drive_config, fake_drive, tmp_path):
    team = fake_drive.add_shared_drive("team", organizers=("cid.apps.googleusercontent.com",))
    drive_config.folder, drive_config.keep = f"id:{team['id']}", 1
    _train_on_machine_a(drive_config, tmp_path, steps=(100, 200, 300))
    names = sorted(f["name"] for f in fake_drive.live_files() if f["name"].startswith("snapshot-"))
    assert names == ["snapshot-000000300-flowers.tar.gz"]  # the newest is also the best: old ones deleted
    b = open_sync(drive_config, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    assert b.restore_latest() == 300
    b.close(timeout=5)


def test_a_service_account_that_may_not_delete_in_a_shared_drive_still_uploads(drive_config, fake_drive,
                                                                              tmp_path, caplog):
    team = fake_drive.add_shared_drive("team")  # these credentials are a contributor, not an organizer
    drive_config.folder, drive_config.keep = f"id:{team['id']}", 1
    _train_on_machine_a(drive_config, tmp_path, steps=(100, 200, 300))  # each one says "uploaded"
    assert "could not be deleted" in caplog.text and "Manager role" in caplog.text
    assert "Traceback" not in caplog.text


PERMANENT = [("dailyLimitExceeded", False, "daily Drive API quota"), ("domainPolicy", False, "administrator"),
             ("accessNotConfigured", False, "enable it"), ("SERVICE_DISABLED", True, "enable it"),
             ("insufficientPermissions", False, "scope"), ("ACCESS_TOKEN_SCOPE_INSUFFICIENT", True, "scope"),
             ("insufficientFilePermissions", False, "share sync.folder")]


@pytest.mark.parametrize("reason,new_only,advice", PERMANENT, ids=[r for r, _, _ in PERMANENT])
def test_a_permanent_error_during_upload_is_one_line_and_training_continues(drive_config, fake_drive, tmp_path,
                                                                           caplog, reason, new_only, advice):
    fault = fake_drive.inject("http", on="list", times=10_000, status=403, reason=reason, new_format_only=new_only)
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    _checkpoint(sync, 100)
    outcome = sync.close(timeout=30).message
    assert "still pending" in outcome and advice in outcome and "the snapshot stays queued" in caplog.text
    errors = [r for r in caplog.records if r.name == "sync" and r.levelname == "ERROR"]
    assert len(errors) == fault.hits <= 2  # one line per attempt (the first, and the one at close), no retries
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.name.startswith("googleapiclient")]


@pytest.mark.parametrize("reason,new_only,advice", PERMANENT[:3], ids=[r for r, _, _ in PERMANENT[:3]])
def test_a_permanent_error_during_restore_is_a_sync_error_naming_the_fix(drive_config, fake_drive, tmp_path,
                                                                        reason, new_only, advice):
    fake_drive.inject("http", on="list", times=10_000, status=403, reason=reason, new_format_only=new_only)
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    with pytest.raises(RemoteError, match=advice):
        sync.restore_latest()
    sync.close(timeout=1)


def test_an_abusive_file_is_skipped_on_restore_for_the_previous_snapshot(drive_config, fake_drive, tmp_path):
    _train_on_machine_a(drive_config, tmp_path)
    fake_drive.inject("http", on="media", times=1, skip=1, status=403, reason="cannotDownloadAbusiveFile")
    b = open_sync(drive_config, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    assert b.restore_latest() == 100
    b.close(timeout=5)


def test_storage_full_with_trash_counting_is_reported_as_storage(drive_config, fake_drive, tmp_path):
    fake_drive.storage_limit = 1000
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    _checkpoint(sync, 100)
    outcome = sync.close(timeout=30).message
    assert "no storage left" in outcome and "trash" in outcome


def test_a_second_run_in_the_same_drive_folder_is_refused(drive_config, fake_drive, tmp_path):
    _train_on_machine_a(drive_config, tmp_path, steps=(100,))
    other = open_sync(drive_config, tmp_path / "other/run", tmp_path / "other/cache", "daisies")
    _checkpoint(other, 500)
    outcome = other.close(timeout=30).message
    assert "another run ('flowers'" in outcome and "its own sync.folder" in outcome
    assert not fake_drive.live_files("snapshot-000000500-daisies.tar.gz")


def test_unexpected_http_errors_never_escape_raw(drive_config, fake_drive, tmp_path):
    from googleapiclient.errors import HttpError
    fake_drive.inject("http", on="list", times=10_000, status=400, reason="invalidParameter")
    sync = open_sync(drive_config, tmp_path / "run", tmp_path / "cache", "r1")
    with pytest.raises(SyncError) as info:
        sync.restore_latest()
    assert not isinstance(info.value, HttpError) and "HTTP 400 (invalidParameter)" in str(info.value)
    sync.close(timeout=1)


def test_a_sync_folder_deleted_during_the_run_is_made_again(drive_config, fake_drive, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    backend = make_backend(drive_config, tmp_path / "s")
    backend.put("a.bin", path, {})
    folder = fake_drive.live_files("a.bin")[0]["parents"][0]
    with fake_drive.lock:  # deleted in the Drive web page (with its content)
        for fid in [f["id"] for f in fake_drive.files.values() if folder in f["parents"]] + [folder]:
            del fake_drive.files[fid]
    backend.put("b.bin", path, {})
    assert fake_drive.path_of(fake_drive.live_files("b.bin")[0]) == "runs/flowers/b.bin"


def test_a_junk_copy_under_a_snapshots_name_is_skipped_for_the_verified_copy(drive_config, fake_drive, tmp_path,
                                                                            caplog):
    _train_on_machine_a(drive_config, tmp_path, steps=(100,))
    [good] = [f for f in fake_drive.live_files() if f["name"].startswith("snapshot-")]
    junk = fake_drive.add_file(good["name"], b"not a snapshot", parent=good["parents"][0],
                               created="2020-01-01T00:00:00.000Z")
    junk["modifiedTime"] = "2020-01-01T00:00:00.000Z"  # an older copy of that name: listed after the good one
    assert len(fake_drive.live_files(good["name"])) == 2
    b = open_sync(drive_config, tmp_path / "b/run", tmp_path / "b/cache", "flowers")
    assert b.restore_latest() == 100
    assert (tmp_path / "b/run/checkpoints").is_dir()
    b.close(timeout=5)

    fake_drive.files[good["id"]]["trashed"] = True  # only the junk copy is left: it is tried, and refused
    c = open_sync(drive_config, tmp_path / "c/run", tmp_path / "c/cache", "flowers")
    with pytest.raises(SyncError, match="passed verification"):
        c.restore_latest()
    assert f"snapshot {good['name']} skipped" in caplog.text
    c.close(timeout=5)
