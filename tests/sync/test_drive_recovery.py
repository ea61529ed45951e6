"""One put's recoveries against the HTTPS fake Drive (the real google-api-python-client): each kind stops at
its stated limit, mixed kinds count against the one total, recoveries never wait, and docs/sync.md states the
budget the code computes."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sync.backends import make_backend
from sync.backends.drive import PUT_RECOVERIES, attempt_requests
from sync.errors import IntegrityError, SyncError
from sync.retry import Md5Mismatch, RetryPolicy, SessionGone
from tests.sync.test_drive_backend import CHUNK, exactly_one_verified_copy

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sync.md"


@pytest.fixture
def backend(drive_config, tmp_path):
    """The Drive backend with its policy's waits recorded (a recovery must add none)."""
    backend = make_backend(drive_config, tmp_path / "state")
    backend.waits = []
    backend.retry.sleep = backend.waits.append
    return backend


@pytest.fixture
def big(tmp_path):
    """Four chunks, uploaded resumably."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * CHUNK + CHUNK // 2))
    return path


def uploads(fake) -> int:
    """Multipart uploads (creates and in-place updates) the fake received."""
    return sum(1 for c, _, p in fake.log if c == "create" and p.startswith("/upload"))


def test_a_copy_that_always_arrives_corrupted_is_sent_the_stated_number_of_times(backend, fake_drive, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(5000))
    fake_drive.inject("corrupt", on="create", times=100)
    with pytest.raises(IntegrityError, match=r"uploading small\.bin gave up after md5 mismatch 3 times.*small\.bin"):
        backend.put("small.bin", small, {"kind": "x"})
    assert uploads(fake_drive) == PUT_RECOVERIES.attempts_of(Md5Mismatch) == 3
    assert backend.waits == []


def test_a_resumable_copy_that_always_arrives_corrupted_is_sent_the_stated_number_of_times(backend, fake_drive, big):
    fake_drive.inject("corrupt", on="chunk", times=100)
    with pytest.raises(IntegrityError, match=r"uploading big\.bin gave up after md5 mismatch"):
        backend.put("big.bin", big, {"kind": "x"})
    sends = PUT_RECOVERIES.attempts_of(Md5Mismatch)
    assert fake_drive.sessions_started == sends and fake_drive.chunk_bytes_received == sends * big.stat().st_size
    assert backend.waits == []


def test_sessions_that_drive_keeps_forgetting_stop_at_the_stated_number(backend, fake_drive, big):
    fake_drive.inject("expire", on="chunk", times=100)
    with pytest.raises(SyncError, match=r"uploading big\.bin gave up after upload session gone 3 times.*big\.bin"):
        backend.put("big.bin", big, {"kind": "x"})
    assert fake_drive.sessions_started == PUT_RECOVERIES.attempts_of(SessionGone) == 3
    assert fake_drive.live_files("big.bin") == [] and backend.waits == []


def mixed_faults(fake) -> None:
    """A refused file id, two forgotten sessions, then a corrupted copy: four recoveries, the stated total."""
    fake.inject("http", on="start", status=400, reason="invalid")
    fake.inject("expire", on="chunk", times=2)
    fake.inject("corrupt", on="chunk", skip=3)  # the fourth (last) chunk of the next session


def test_mixed_recoveries_up_to_the_total_end_in_one_verified_copy(backend, fake_drive, big):
    mixed_faults(fake_drive)
    backend.put("big.bin", big, {"kind": "x"})
    exactly_one_verified_copy(fake_drive, "big.bin", big)
    starts = sum(1 for c, _, _ in fake_drive.log if c == "start")
    assert starts == PUT_RECOVERIES.attempts == PUT_RECOVERIES.total + 1  # one session start per attempt
    assert backend.waits == []


def test_one_recovery_past_the_total_fails_though_each_kind_is_within_its_limit(backend, fake_drive, big):
    mixed_faults(fake_drive)
    fake_drive.inject("corrupt", on="chunk", skip=3)  # md5 mismatch number 2: within its limit of 2
    with pytest.raises(IntegrityError, match=r"uploading big\.bin gave up after 5 attempts .*md5 mismatch x2; "
                                             r"at most 4 recoveries in all"):
        backend.put("big.bin", big, {"kind": "x"})
    assert PUT_RECOVERIES.limits[Md5Mismatch] >= 2
    assert sum(1 for c, _, _ in fake_drive.log if c == "start") == PUT_RECOVERIES.attempts


def test_a_sync_folder_deleted_before_a_resumable_upload_is_made_again(backend, fake_drive, big, tmp_path):
    """The 404 is on the start of the session (the parent is gone), not on the session: the folder is looked up
    again, not a new session started three times."""
    first = tmp_path / "first.bin"
    first.write_bytes(b"x")
    backend.put("first.bin", first, {})
    folder = fake_drive.live_files("first.bin")[0]["parents"][0]
    with fake_drive.lock:  # deleted in the Drive web page (with its content)
        for fid in [f["id"] for f in fake_drive.files.values() if folder in f["parents"]] + [folder]:
            del fake_drive.files[fid]
    backend.put("big.bin", big, {"kind": "x"})
    exactly_one_verified_copy(fake_drive, "big.bin", big)


def test_docs_state_the_budget_the_code_computes():
    text = " ".join(DOCS.read_text().split())
    m = re.search(r"a (\d+) MiB file into `runs/flowers` \(chunks of (\d+) MiB\) makes at most (\d+) attempts of at "
                  r"most (\d+) requests: (\d+) requests, ([\d,]+) tries and ([\d,]+) s", text)
    assert m, "docs/sync.md no longer states the worst case of one put"
    size_mib, chunk_mib, attempts, per_attempt, requests, tries, wait_s = (int(g.replace(",", "")) for g in m.groups())
    computed = attempt_requests(size_mib * 2**20, chunk_mib * 2**20, folder_levels=2)
    worst = RetryPolicy().worst_case(computed, PUT_RECOVERIES)
    assert (attempts, per_attempt, requests) == (PUT_RECOVERIES.attempts, computed, PUT_RECOVERIES.attempts * computed)
    assert (tries, wait_s) == (worst.tries, round(worst.wait_s))
    for kind, limit in PUT_RECOVERIES.limits.items():
        assert f"{kind.label} {limit}" in text, f"docs/sync.md does not state the limit of {kind.label}"
    assert f"{PUT_RECOVERIES.total} recoveries in all" in text
