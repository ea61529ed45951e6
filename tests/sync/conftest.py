"""Fixtures for sync tests: the HTTPS fake Drive and a drive-backend SyncConfig that reaches it."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from sync import SyncConfig
from tests.fake_drive.server import FakeDrive
from tests.sync.helpers import TIMEOUT_S, TRIES


@pytest.fixture
def fake_drive(tmp_path):
    """A fresh fake Drive v3 on https://127.0.0.1:PORT/ with its own self-signed certificate.

    Every fault a test injects must have acted by the test's end: one that never fired tested nothing."""
    with FakeDrive(tmp_path / "tls") as fake:
        yield fake
        unfired = fake.unfired()
    assert not unfired, f"injected faults that never fired: {unfired}"


@pytest.fixture
def user_credentials(tmp_path, fake_drive):
    """An authorized-user JSON whose token_uri is the fake's token endpoint."""
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "cid.apps.googleusercontent.com",
                                "client_secret": "s3cr3t-client", "refresh_token": "r3fr3sh-t0ken",
                                "token_uri": fake_drive.token_uri}))
    return path


@pytest.fixture
def drive_config(fake_drive, user_credentials):
    """A drive-backend config reaching the fake only through the public sync.* keys, with short test timings.

    The timeout is short so stalls are quick to detect; the tries are generous so a loaded machine (the
    whole suite runs beside TensorFlow training) does not exhaust them.
    """
    return SyncConfig(backend="drive", folder="runs/flowers", credentials=str(user_credentials),
                      api_endpoint=fake_drive.url, ca_certs=str(fake_drive.cert), chunk_mib=0.25,
                      retries=TRIES, backoff_s=0.05, timeout_s=TIMEOUT_S)


@pytest.fixture(autouse=True)
def _sync_debug_logs(caplog):
    caplog.set_level(logging.INFO, logger="sync")


def credentials_file(path, fake, client_id: str, refresh_token: str, scopes: list[str] | None = None):
    """An authorized-user JSON of OAuth client client_id whose token_uri is the fake's (optionally with scopes)."""
    info = {"type": "authorized_user", "client_id": client_id, "client_secret": f"secret-of-{client_id}",
            "refresh_token": refresh_token, "token_uri": fake.token_uri}
    if scopes is not None:
        info["scopes"] = scopes
    path.write_text(json.dumps(info))
    return path


@pytest.fixture
def other_machine_config(fake_drive, drive_config, tmp_path):
    """Machine B: the same Drive account and folder through another OAuth client (its own app)."""
    path = credentials_file(tmp_path / "machine-b.json", fake_drive, "machine-b.apps.googleusercontent.com",
                            "b-refresh")
    return dataclasses.replace(drive_config, credentials=str(path))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: subprocess-heavy tests (real training runs)")
