"""Session-wide fixtures: the real clothing-small run is trained once and shared by the tests."""
from __future__ import annotations

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


ALL_EXPORT_FORMATS = "saved_model,tflite,tflite_quantized,tf1,labels"  # the shared run's export has every format


@pytest.fixture(scope="session")
def shared_assets():
    """../shared must be present (it always is in CI): fail loudly rather than skip."""
    missing = [p for p in (CLOTHING, MOBILENET_WEIGHTS) if not p.exists()]
    if missing:
        pytest.fail(f"shared test assets missing: {missing}; clone the project next to ../shared")
    return CLOTHING, MOBILENET_WEIGHTS


@pytest.fixture(scope="session")
def clothing_run(tmp_path_factory, shared_assets):
    """One default run on clothing-small with real weights, exported in every format: (run_dir, cache_dir, output)."""
    root = tmp_path_factory.mktemp("clothing")
    run_dir, cache_dir = root / "run", root / "cache"
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, f"export.formats={ALL_EXPORT_FORMATS}", export=True))
    assert result.returncode == 0, result.stdout
    return run_dir, cache_dir, result.stdout


@pytest.fixture(scope="session")
def exported_run(clothing_run):
    """The export that training wrote at the end of the shared clothing run: (run_dir, cache_dir, export_dir)."""
    run_dir, cache_dir, _ = clothing_run
    assert (run_dir / "export" / "model.json").exists(), "the clothing_run fixture must train with export on"
    return run_dir, cache_dir, run_dir / "export"
