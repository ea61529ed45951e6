"""One exit-status table: transient failures are retried by --supervise, fixable ones end with 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from runner.run.supervise import supervise
from tests.chaos.conftest import small_args
from tests.helpers import REPO, run_resume

pytestmark = pytest.mark.slow
EXIT_USER_ERROR, EXIT_TRANSIENT = 2, 75  # the table in common/errors.py, as a user reads it in README


def _drive_settings(drive_config) -> list[str]:
    return [f"sync.{k}={getattr(drive_config, k)}" for k in
            ("backend", "folder", "credentials", "api_endpoint", "ca_certs")] + ["sync.retries=2", "sync.backoff_s=0.01"]


def test_a_network_failure_during_restore_is_transient_not_a_user_error(drive_config, fake_drive, small_data, tmp_path):
    fake_drive.inject("503", on="list", times=1000)
    result = run_resume(*small_args(tmp_path / "run", tmp_path / "cache", small_data, *_drive_settings(drive_config)))
    assert result.returncode == EXIT_TRANSIENT, result.stdout
    assert "failed after 2 tries (HTTP 503" in result.stdout and "Traceback" not in result.stdout
    assert "run the same command again" in result.stdout and "snapshot stays queued" not in result.stdout


def test_the_supervisor_retries_transient_failures_and_stops_on_fixable_ones(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys, pathlib\n"
                      "count = pathlib.Path(sys.argv[1])\n"
                      "n = int(count.read_text()) if count.exists() else 0\n"
                      "count.write_text(str(n + 1))\n"
                      "sys.exit([int(c) for c in sys.argv[2].split(',')][n])\n")
    assert supervise([str(script), str(tmp_path / "a"), f"{EXIT_TRANSIENT},{EXIT_TRANSIENT},0"], 5, 0.01) == 0
    assert (tmp_path / "a").read_text() == "3"
    assert supervise([str(script), str(tmp_path / "b"), f"{EXIT_USER_ERROR},0"], 5, 0.01) == EXIT_USER_ERROR
    assert (tmp_path / "b").read_text() == "1"


def test_a_full_disk_ends_with_2_naming_the_path(small_data, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        result = run_resume(*small_args(small / "run", tmp_path / "cache", small_data, export=True))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
    assert result.returncode == EXIT_USER_ERROR, result.stdout
    assert "is full" in result.stdout or "disk is full" in result.stdout, result.stdout
    assert str(small / "run") in result.stdout and "unexpected" not in result.stdout


def test_readme_documents_the_exit_status_table():
    readme = (REPO / "README.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", f"| {EXIT_TRANSIENT} |", "| 130 |"):
        assert code in readme, code
