"""Runs that follow the data: a class added, removed or renamed, or images added, between two runs of the same
command → a new data version trained from the cache (only new images through the CNN), the previous version's
results kept under RUN_DIR/versions/, steps continuing so sync's newest snapshot is the newest version's."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from runner.run.results import Finished, Unchanged
from runner.run.rundir import RunDir
from tests.helpers import write_synthetic_dataset
from tests.test_job import RecordingSync, tiny_config


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("tiny-source"), num_classes=3, per_class=20, size=40)
    _age(root)
    return root


def _age(root) -> None:
    """Photos on a disk are older than the scan's racy window: give the generated ones a past mtime."""
    past = time.time() - 3600
    for path in root.rglob("*.jpg"):
        os.utime(path, (past, past))


def _noise_images(folder, count: int, seed: int) -> None:
    """`count` new, distinct images (content no other test image has)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"new_{seed}_{i}.jpg")
    _age(folder)


def _run(config, sync=None):
    from runner.job import Job
    job = Job(config, sync or RecordingSync())
    return job, job.run()


@pytest.fixture(scope="module")
def trained_first_version(tiny_source, tmp_path_factory):
    """One finished 20-step run on a copy of the tiny data, trained once for the module: (data dir, run dir)."""
    root = tmp_path_factory.mktemp("first-version")
    data = shutil.copytree(tiny_source, root / "data")
    _, outcome = _run(tiny_config(root / "run", data, "train.steps=20"))
    assert isinstance(outcome, Finished) and outcome.summary.global_step == 20
    return data, root / "run"


@pytest.fixture
def first_version(trained_first_version, tmp_path):
    """This test's own copy of the finished first version (data and run dir, times kept): (data dir, config)."""
    data = shutil.copytree(trained_first_version[0], tmp_path / "data")
    run_dir = shutil.copytree(trained_first_version[1], tmp_path / "run")
    return data, tiny_config(run_dir, data, "train.steps=20")


def _assert_new_version(config, outcome, job, num_classes: int, computed: int):
    assert isinstance(outcome, Finished), outcome
    summary = outcome.summary
    assert summary.num_classes == num_classes and summary.data_version == 2
    assert summary.global_step == 40 and summary.head_steps == 20, "steps continue after version 1's last one"
    assert job.prepared.computed == computed, "only images not cached go through the CNN"
    run = RunDir(config.run_dir)
    old = json.loads((run.version_folder(1) / "summary.json").read_text())
    assert old["num_classes"] == 3 and old["global_step"] == 20, "version 1's results stay readable"
    assert [c.step for c in RunDir(run.version_folder(1)).checkpoints()][0] == 20
    assert [c.step for c in run.checkpoints()][0] == 40


def test_a_class_added_between_runs_starts_a_new_version_that_extracts_only_its_images(first_version, caplog):
    data, config = first_version
    _noise_images(data / "class_new", 8, seed=1)
    with caplog.at_level(logging.WARNING, logger="runner"):
        job, outcome = _run(config)
    _assert_new_version(config, outcome, job, 4, 8)
    assert any("1 class(es) added ('class_new')" in r.getMessage() and "8 image(s) added, 0 removed" in r.getMessage()
               for r in caplog.records)


def test_a_class_removed_between_runs_trains_the_remaining_ones_from_the_cache(first_version):
    data, config = first_version
    shutil.rmtree(data / "class_0002")
    job, outcome = _run(config)
    _assert_new_version(config, outcome, job, 2, 0)


def test_a_renamed_class_is_named_as_renamed_and_costs_no_extraction(first_version, caplog):
    data, config = first_version
    (data / "class_0001").rename(data / "sneakers")
    with caplog.at_level(logging.WARNING, logger="runner"):
        job, outcome = _run(config)
    _assert_new_version(config, outcome, job, 3, 0)
    assert "sneakers" in outcome.summary.classes
    assert any("1 renamed ('class_0001' → 'sneakers')" in r.getMessage() for r in caplog.records)


def test_images_added_to_a_class_start_a_new_version_extracting_only_them(first_version):
    data, config = first_version
    _noise_images(data / "class_0000", 5, seed=2)
    job, outcome = _run(config)
    _assert_new_version(config, outcome, job, 3, 5)


def test_unchanged_data_is_no_new_version(first_version):
    _, config = first_version
    job, outcome = _run(config)
    assert isinstance(outcome, Unchanged) and outcome.summary.data_version == 1
    assert not RunDir(config.run_dir).version_folder(1).exists()


def test_a_start_killed_while_archiving_is_finished_by_the_next_one(first_version):
    from runner.run.dataversion import RunVersion
    data, config = first_version
    _noise_images(data / "class_new", 4, seed=3)
    run = RunDir(config.run_dir)
    partial = run.begin_archive(1)   # what a kill right after the decision leaves (no version record yet)
    (run.path / "summary.json").replace(partial / "summary.json")
    job, outcome = _run(config)
    _assert_new_version(config, outcome, job, 4, 4)
    assert run.read_version() == RunVersion(2, 20) and run.unfinished_archive() is None


def test_a_fresh_machine_restores_the_newest_data_version_from_sync(tiny_source, tmp_path):
    from sync import open_sync
    data = shutil.copytree(tiny_source, tmp_path / "data")
    folder = tmp_path / "remote"

    def synced_run(run_dir):
        config = tiny_config(run_dir, data, "train.steps=20", f"sync.folder={folder}")
        sync = open_sync(config.sync, config.run_dir, config.cache_dir, run_id=config.run_dir.name)
        try:
            return _run(config, sync)[1]
        finally:
            sync.close(60)
    assert isinstance(synced_run(tmp_path / "a" / "run"), Finished)
    _noise_images(data / "class_new", 6, seed=4)
    second = synced_run(tmp_path / "a" / "run")
    assert isinstance(second, Finished) and second.summary.data_version == 2
    fresh = synced_run(tmp_path / "b" / "run")  # another VM: an empty disk, the same command
    assert isinstance(fresh, Unchanged) and fresh.summary.data_version == 2 and fresh.summary.num_classes == 4


def test_a_changed_split_is_a_new_version_never_the_old_heads_figures_on_former_training_images(first_version,
                                                                                                caplog):
    from runner.job import Job
    data, _ = first_version
    config = tiny_config(first_version[1].run_dir, data, "train.steps=20", "split.validation_percent=30")
    job = Job(config, RecordingSync())
    with caplog.at_level(logging.WARNING, logger="runner"):
        outcome = job.run()
    assert isinstance(outcome, Finished), outcome
    summary = outcome.summary
    assert summary.data_version == 2 and summary.head_steps == 20 and summary.global_step == 40, \
        "the head is trained anew on the new training split"
    assert any("split anew" in r.getMessage() for r in caplog.records)


def test_photos_moved_between_classes_are_named_as_moved_and_start_a_new_version(first_version, caplog):
    data, config = first_version
    moved = sorted((data / "class_0000").glob("*.jpg"))[:2]
    for photo in moved:
        photo.rename(data / "class_0001" / photo.name)
    with caplog.at_level(logging.WARNING, logger="runner"):
        job, outcome = _run(config)
    _assert_new_version(config, outcome, job, 3, 0)
    assert any("2 image(s) moved to another class" in r.getMessage() for r in caplog.records)


def test_a_deleted_version_record_and_changed_data_start_the_next_version_not_a_failing_archive(first_version,
                                                                                                caplog):
    data, config = first_version
    _noise_images(data / "class_0000", 3, seed=5)
    job, outcome = _run(config)
    _assert_new_version(config, outcome, job, 3, 3)
    run = RunDir(config.run_dir)
    run.version_record.unlink()  # the user deletes version.json, then the data changes again
    _noise_images(data / "class_0001", 3, seed=6)
    with caplog.at_level(logging.WARNING, logger="runner"):
        job, outcome = _run(config)
    assert isinstance(outcome, Finished), outcome
    assert outcome.summary.data_version == 3 and outcome.summary.global_step == 60, "steps never rewind"
    assert run.archived_versions() == [1, 2] and run.unfinished_archive() is None
    assert json.loads((run.version_folder(2) / "summary.json").read_text())["global_step"] == 40
    assert any("version.json is missing" in r.getMessage() for r in caplog.records)
    assert isinstance(_run(config)[1], Unchanged), "the next start goes on from there"
