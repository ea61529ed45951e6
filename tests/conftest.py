"""Session-wide fixtures: the real clothing-small run is trained once and shared by the tests."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import CLOTHING, MOBILENET_WEIGHTS, local_mobilenet_args, run_resume

# a test that needs a real training run (the shared one, or its own on the real photos) is slow by definition
SLOW_FIXTURES = {"shared_assets", "clothing_run", "exported_run"}


def pytest_collection_modifyitems(items):
    """Mark every test that trains on the real photos as slow, and run the slow ones first: with `-n 2`
    the two workers then end together instead of one waiting on a long test started last."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


ALL_EXPORT_FORMATS = "saved_model,meta_graph,tflite,tflite_quantized,tf1,labels"  # the shared run's export has every format


@pytest.fixture(scope="session")
def shared_assets():
    """../shared must be present (it always is in CI): fail loudly rather than skip."""
    missing = [p for p in (CLOTHING, MOBILENET_WEIGHTS) if not p.exists()]
    if missing:
        pytest.fail(f"shared test assets missing: {missing}; clone the project next to ../shared")
    return CLOTHING, MOBILENET_WEIGHTS


def session_dir(tmp_path_factory, name: str) -> Path:
    """A folder this test session's xdist workers share (a worker's own base temp is `<session>/popen-gwN`)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / name
    path.mkdir(exist_ok=True)
    return path


@contextmanager
def exclusive(folder: Path):
    """Hold an exclusive lock on `folder` (a lock file in it) across processes."""
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def clothing_run(tmp_path_factory, shared_assets):
    """One default run on clothing-small with real weights, exported in every format: (run_dir, cache_dir, output).

    Trained once per test session: the first worker to need it trains it while the other waits, and both read
    it. Read-only: a test that changes a run copies it first."""
    root = session_dir(tmp_path_factory, "clothing")
    run_dir, cache_dir = root / "run", root / "cache"
    output, failure = root / "output.txt", root / "failed.txt"
    with exclusive(root):
        if not output.exists() and not failure.exists():
            result = run_resume(*local_mobilenet_args(run_dir, cache_dir, f"export.formats={ALL_EXPORT_FORMATS}",
                                                      export=True))
            (output if result.returncode == 0 else failure).write_text(result.stdout)  # marks the run as done
    if failure.exists():  # the same failure for every worker, not a second run resuming the failed one
        pytest.fail(f"the shared clothing run failed:\n{failure.read_text()}")
    return run_dir, cache_dir, output.read_text()


@pytest.fixture(scope="session")
def exported_run(clothing_run):
    """The export that training wrote at the end of the shared clothing run: (run_dir, cache_dir, export_dir)."""
    run_dir, cache_dir, _ = clothing_run
    assert (run_dir / "export" / "model.json").exists(), "the clothing_run fixture must train with export on"
    return run_dir, cache_dir, run_dir / "export"
