"""bench/e2e.py's pieces on a tiny generated dataset, so the bench never rots (its figures are not checked)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import MOBILENET_WEIGHTS, child_env, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import e2e  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("e2e") / "data", 2, 10)


def test_every_contender_gets_the_runners_split(tiny, tmp_path):
    from runner.data.scan import HashIndex, scan_dataset
    dataset = scan_dataset(tiny, 25, 25, HashIndex(tmp_path / "hashes.json"), 1, "lines")
    classes, splits = e2e.split_lists(tiny, 25, 25)
    assert classes == dataset.classes
    for name, (paths, labels) in splits.items():
        records = dataset.split(name)
        assert sorted(zip(paths, labels)) == sorted((r.path, r.label) for r in records)


def test_phases_of_our_job_are_read_from_its_output_lines():
    lines = [(1.0, "runner: extraction and training run on the CPU"), (2.0, "runner: checking 20 image files in /d"),
             (3.0, "runner: extracting bottlenecks for 20 images (0 already cached)"),
             (7.0, "runner: 2 classes; 10 train / 5 validation / 5 test images; 20 vectors computed now, 20 cached"),
             (8.0, "training head: 1/10 (started)"), (9.0, "training head: 10/10 (9 step/s)"),
             (9.5, "runner: head search: learning rate 0.001 ..."), (12.0, "runner: exported step 10 of /r"),
             (12.5, "done: step 10")]
    phases = e2e.phase_seconds(lines, 13.0)
    assert phases == {"startup": 2.0, "scan": 1.0, "extraction": 4.0, "head": 2.5, "export": 2.5, "finish": 1.0}
    assert e2e.phase_reached(lines[:3]) == "extraction" and e2e.phase_reached(lines[:4]) == "head"
    no_export = e2e.phase_seconds(lines[:6], 10.0)  # export off: the head phase ends at its last training line
    assert no_export["export"] == 0 and no_export["finish"] == 1.0 and sum(no_export.values()) == 10.0


def test_kills_land_on_the_half_way_markers_not_on_a_clock(tmp_path):
    import numpy as np
    from runner.features.cache_gfile import write_shard
    cache = tmp_path / "cache"
    half_way = e2e.ours_half_way(cache, images=5)
    (cache / "identity-x").mkdir(parents=True)
    write_shard(str(cache / "identity-x"), [f"{i:064x}" for i in range(2)], np.zeros((2, 4)), "float16")
    assert e2e.cached_vectors(cache) == 2 and not half_way()
    write_shard(str(cache / "identity-x"), [f"{i:064x}" for i in range(2, 3)], np.zeros((1, 4)), "float16")
    assert e2e.cached_vectors(cache) == 3 and half_way()
    assert e2e.guide_half_way(20)("Epoch 11/20\n") and not e2e.guide_half_way(20)("Epoch 10/20")
    child = [sys.executable, "-c", "import time\nfor i in range(5): print(f'Epoch {i + 1}/4', flush=True); time.sleep(2)"]
    wall, lines, code, killed = e2e.run_timed(child, e2e.guide_half_way(4))
    assert killed and code == -9 and lines[-1][1] == "Epoch 3/4"
    with pytest.raises(SystemExit, match="never reached its half-way marker"):
        e2e.killed_run([sys.executable, "-c", "print('Epoch 1/4')"], "the guide", e2e.guide_half_way(4))
    marker = tmp_path / "marker"
    child = [sys.executable, "-c", f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(60)"]
    _, _, code, killed = e2e.run_timed(child, kill_when=marker.exists)
    assert killed and code == -9


def test_the_keras_guide_workflow_trains_evaluates_and_saves(tiny, tmp_path):
    result = e2e.keras_guide(tiny, str(MOBILENET_WEIGHTS), 1, tmp_path / "guide", 25, 25)
    assert Path(result["model"]).stat().st_size > 0
    assert result["num_test"] == len(e2e.split_lists(tiny, 25, 25)[1]["test"][0]) > 0
    assert 0.0 <= result["test_acc"] <= 1.0


def test_per_image_way_and_extraction_bound_are_measured(tiny):
    paths = sorted(str(p) for p in tiny.rglob("*.jpg"))
    rates = e2e.extraction_rates(str(MOBILENET_WEIGHTS), paths, 4)
    assert rates["per_image_timed_on"] == 4 and rates["per_image_s"] > 0
    assert rates["bound_img_s"] < min(rates["decode_img_s"], rates["forward_img_s"])
    assert rates["bound_extraction_s"] == pytest.approx(len(paths) / rates["bound_img_s"])


@pytest.mark.slow
def test_quick_mode_prints_every_figure_as_json():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "e2e.py"), "--quick", "--json"], env=child_env(),
                         capture_output=True, text=True, timeout=900, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    for key in ("ours_s", "ours_test_acc", "keras_guide_s", "keras_guide_test_acc", "ours_after_kill_s",
                "keras_guide_after_kill_s", "bound_s"):
        assert figures[key] is not None, key
    assert sum(figures["ours_phases_s"].values()) == pytest.approx(figures["ours_s"], abs=0.5)
    assert figures["ours_kill_cost_s"] is not None and figures["keras_guide_kill_cost_s"] is not None
