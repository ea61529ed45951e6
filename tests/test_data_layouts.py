"""Data as it ships: pre-split trees (DATA/<split>/<class>/) trained on the dataset's own split, and a folder of
images named by a label file (data.labels = FILE.csv); both resume after a kill, follow added images as new data
versions, and train as well as a tuned logistic regression on the same split. Built from the real clothing
photos, linked into temporary trees."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from runner.data.scan import HashIndex, scan_dataset
from runner.data.splits import split_of
from runner.errors import DataError
from runner.run.results import Finished, Unchanged
from runner.run.rundir import RunDir
from tests.helpers import (CLOTHING, local_mobilenet_args, logistic_regression_reference, run_resume,
                           sigkill_once_shards, summary)
from tests.test_data_versions import _noise_images
from tests.test_job import RecordingSync, tiny_config

CLASSES = ("hat", "pants", "shoes")


@pytest.fixture
def photos():
    """The real clothing photos (present in CI: fail loudly rather than skip); scanning them is fast, so unlike
    shared_assets this does not mark a test slow."""
    if not CLOTHING.is_dir():
        pytest.fail(f"shared test assets missing: {CLOTHING}; clone the project next to ../shared")
    return CLOTHING


def _link(source: Path, target: Path) -> None:
    """The photo at `target` (a hard link; a copy with its times where links cannot cross file systems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def pre_split_tree(root: Path, folders: tuple[str, ...], per_class: int = 15, classes=CLASSES) -> dict[str, int]:
    """root/<folder>/<class>/ from the first `per_class` photos of each class, dealt round-robin over
    `folders` in the proportions 3:1:1 (train-like first); returns the photo count per folder."""
    deal = [folders[0]] * 3 + list(folders[1:]) if len(folders) > 1 else [folders[0]]
    counts = dict.fromkeys(folders, 0)
    for name in classes:
        for i, photo in enumerate(sorted((CLOTHING / name).glob("*.jpg"))[:per_class]):
            folder = deal[i % len(deal)]
            _link(photo, root / folder / name / photo.name)
            counts[folder] += 1
    return counts


def _scan(root: Path, tmp_path: Path, **options):
    return scan_dataset(root, 10, 10, HashIndex(tmp_path / "hashes.json"), 1, "lines", **options)


def _run(config):
    from runner.job import Job
    job = Job(config, RecordingSync())
    return job, job.run()


# -- pre-split trees ---------------------------------------------------------------------------------------------
def test_a_pre_split_tree_trains_its_classes_on_the_datasets_own_split(photos, tmp_path):
    counts = pre_split_tree(tmp_path / "data", ("train", "validation", "test"))
    _, outcome = _run(tiny_config(tmp_path / "run", tmp_path / "data", "train.steps=20"))
    assert isinstance(outcome, Finished), outcome
    s = summary(tmp_path / "run")
    assert s["classes"] == list(CLASSES), "the classes are the class folders, not train/validation/test"
    assert (s["num_train"], s["num_val"], s["num_test"]) == (counts["train"], counts["validation"], counts["test"])
    assert s["data_layout"]["layout"] == "splits" and s["data_layout"]["split_source"] == "dataset"
    assert s["data_layout"]["dataset_splits"] == counts


def test_the_log_says_which_layout_and_split_were_used(photos, tmp_path, caplog):
    pre_split_tree(tmp_path / "data", ("Training", "val", "Test"))
    with caplog.at_level("INFO", logger="runner"):
        dataset = _scan(tmp_path / "data", tmp_path)
    assert dataset.classes == list(CLASSES)
    assert ("data layout: pre-split folders (Training/, val/, Test/); split: the dataset's own split "
            "(train / validation / test)") in caplog.text


def test_train_and_test_folders_carve_validation_out_of_train_by_the_stable_hash(photos, tmp_path):
    counts = pre_split_tree(tmp_path / "data", ("train", "test"), per_class=40)
    dataset = _scan(tmp_path / "data", tmp_path)
    assert dataset.classes == list(CLASSES)
    assert len(dataset.split("test")) == counts["test"], "the dataset's own test split, untouched"
    assert all(r.relpath.startswith("test/") for r in dataset.split("test"))
    from_train = [r for r in dataset.images if r.source_split == "train"]
    assert len(from_train) == counts["train"]
    assert {r.relpath for r in dataset.split("validation")} == \
        {r.relpath for r in from_train if split_of(r.relpath, 10, 0) == "validation"} != set()
    layout = dataset.layout_json()
    assert layout["split_source"] == "dataset+hash" and layout["dataset_splits"] == counts
    assert "validation = 10 % of train by the stable hash" in layout["split"]


def test_train_and_validation_folders_carve_test_out_of_train_by_the_stable_hash():
    from runner.data.splits import SplitPlan
    plan = SplitPlan(frozenset({"train", "validation"}), 10, 20)
    keys = [f"train/hat/{i}.jpg" for i in range(200)]
    assert [plan.assign(k, "train") for k in keys] == [split_of(k, 0, 20) for k in keys]
    assert {plan.assign(k, "train") for k in keys} == {"train", "test"}
    assert plan.assign("val/hat/1.jpg", "validation") == "validation" and plan.source == "dataset+hash"
    assert "test = 20 % of train by the stable hash" in plan.describe()


def test_a_train_folder_alone_is_split_by_the_stable_hash(photos, tmp_path):
    pre_split_tree(tmp_path / "data", ("train",), per_class=40)
    dataset = _scan(tmp_path / "data", tmp_path)
    assert dataset.classes == list(CLASSES) and dataset.layout.plan.source == "hash"
    assert all(r.split == split_of(r.relpath, 10, 10) for r in dataset.images)
    assert dataset.split("validation") and dataset.split("test")


def test_a_top_level_mixing_split_folders_and_other_folders_exits_2_naming_them(photos, tmp_path):
    pre_split_tree(tmp_path / "data", ("train", "test"), per_class=6)
    _link(next((CLOTHING / "hat").glob("*.jpg")), tmp_path / "data" / "extra" / "x.jpg")
    result = run_resume("--config", str(Path(__file__).parents[1] / "configs" / "clothing_local.toml"),
                        "--set", f"data.dir={tmp_path / 'data'}", "--set", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stdout
    assert "'extra'" in result.stdout and "'test', 'train'" in result.stdout
    assert "data.layout = splits" in result.stdout and "data.layout = classes" in result.stdout
    assert "Traceback" not in result.stdout


def test_data_layout_forces_either_reading_of_a_mixed_top_level(photos, tmp_path, caplog):
    pre_split_tree(tmp_path / "data", ("train", "test"), per_class=6)
    for photo in sorted((CLOTHING / "skirt").glob("*.jpg"))[:6]:
        _link(photo, tmp_path / "data" / "extra" / photo.name)
    with caplog.at_level("WARNING", logger="runner"):
        assert _scan(tmp_path / "data", tmp_path, layout="splits").classes == list(CLASSES)
    assert "'extra' of data.dir are not split names and are ignored" in caplog.text
    assert _scan(tmp_path / "data", tmp_path, layout="classes").classes == ["extra", "test", "train"]


def test_a_class_without_training_images_is_refused_and_one_missing_from_test_is_a_warning(photos, tmp_path,
                                                                                            caplog):
    pre_split_tree(tmp_path / "data", ("train", "validation", "test"), per_class=10)
    shutil.rmtree(tmp_path / "data" / "test" / "pants")
    with caplog.at_level("WARNING", logger="runner"):
        _scan(tmp_path / "data", tmp_path)
    assert "class(es) 'pants' have no image in the test folder test/" in caplog.text
    shutil.rmtree(tmp_path / "data" / "train" / "hat")
    with pytest.raises(DataError, match="'hat' have no image in the train folder train/"):
        _scan(tmp_path / "data", tmp_path)


def test_split_folders_holding_images_but_no_class_folders_are_refused(photos, tmp_path):
    for folder in ("train", "test"):
        for photo in sorted((CLOTHING / "hat").glob("*.jpg"))[:3]:
            _link(photo, tmp_path / "data" / folder / photo.name)
    with pytest.raises(DataError, match="hold images but no class folders.*data.labels"):
        _scan(tmp_path / "data", tmp_path)


def test_the_notebook_shows_a_pre_split_trees_classes_with_the_images_of_every_split(photos, tmp_path):
    from runner.ui.notebook import class_images
    counts = pre_split_tree(tmp_path / "data", ("train", "val", "test"), per_class=5)
    shown = class_images(tmp_path / "data")
    assert list(shown) == list(CLASSES) and sum(map(len, shown.values())) == sum(counts.values()) == 15


@pytest.fixture
def pre_split_run(photos, tmp_path):
    """A finished 20-step run on a train/validation/test tree: (data dir, config)."""
    pre_split_tree(tmp_path / "data", ("train", "validation", "test"))
    config = tiny_config(tmp_path / "run", tmp_path / "data", "train.steps=20")
    assert isinstance(_run(config)[1], Finished)
    return tmp_path / "data", config


def test_images_added_to_a_pre_split_tree_make_a_new_data_version_extracting_only_them(pre_split_run):
    data, config = pre_split_run
    job, outcome = _run(config)
    assert isinstance(outcome, Unchanged), "unchanged data: nothing to do"
    _noise_images(data / "train" / "hat", 4, seed=11)
    job, outcome = _run(config)
    assert isinstance(outcome, Finished) and outcome.summary.data_version == 2
    assert job.prepared.computed == 4, "only the new images go through the CNN"
    assert outcome.summary.data_layout["dataset_splits"]["train"] == 27 + 4
    assert json.loads((RunDir(config.run_dir).version_folder(1) / "summary.json").read_text())["num_train"] == 27


def test_an_image_moved_to_another_split_folder_is_a_data_change(pre_split_run):
    data, config = pre_split_run
    moved = next((data / "test" / "shoes").glob("*.jpg"))
    moved.rename(data / "train" / "shoes" / moved.name)
    job, outcome = _run(config)
    assert isinstance(outcome, Finished) and outcome.summary.data_version == 2
    assert outcome.summary.num_test == 8 and job.prepared.computed == 0, "its vector is cached by content"


def test_another_split_of_the_same_images_is_a_data_change(photos, tmp_path):
    pre_split_tree(tmp_path / "data", ("train", "test"), per_class=10)
    from runner.run.dataversion import DataFingerprint
    tree = DataFingerprint.of(_scan(tmp_path / "data", tmp_path))
    carved = DataFingerprint.of(scan_dataset(tmp_path / "data", 30, 10, HashIndex(tmp_path / "h.json"), 1, "lines"))
    assert tree.digest == carved.digest and not tree.same_data(carved)


def test_a_checkpoint_from_before_layouts_existed_still_counts_as_the_same_data(photos, tmp_path):
    from runner.run.dataversion import DataFingerprint
    pre_split_tree(tmp_path / "data", ("train", "test"), per_class=6)
    now = DataFingerprint.of(_scan(tmp_path / "data", tmp_path))
    from runner.run.records import CheckpointMarker
    old = {"step": 10, "classes": list(now.classes), "data": {"images": now.images, "digest": now.digest}}
    marker = CheckpointMarker.from_json(old)
    assert DataFingerprint.from_marker(marker).same_data(now), "no forced new version after the upgrade"
    written = CheckpointMarker.from_json(dict(old, data=now.digest_record().to_json()))
    assert DataFingerprint.from_marker(written) == now


@pytest.mark.slow
def test_kill_during_extraction_of_a_pre_split_tree_then_the_same_command_extracts_only_the_rest(shared_assets,
                                                                                                 tmp_path):
    counts = pre_split_tree(tmp_path / "data", ("train", "val", "test"), per_class=40)
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    args = local_mobilenet_args(run_dir, cache_dir, "cache.shard_size=8", "cache.batch_size=8", "train.steps=10",
                                data_dir=tmp_path / "data")
    shards_before = sigkill_once_shards(args, cache_dir, 2)

    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    assert "data layout: pre-split folders (train/, val/, test/)" in result.stdout
    line = next(x for x in result.stdout.splitlines() if "extracting bottlenecks for" in x)
    todo = int(line.split("for ")[1].split(" images")[0])
    cached = int(line.split("(")[1].split(" already")[0])
    assert cached == 8 * shards_before and todo + cached == sum(counts.values()) == 120
    assert summary(run_dir)["data_layout"]["dataset_splits"] == {"train": 72, "validation": 24, "test": 24}


# -- label files -------------------------------------------------------------------------------------------------
def _image_id(photo: Path) -> str:
    return hashlib.sha1(photo.name.encode()).hexdigest()[:16]


def labelled_folder(root: Path, per_class: int = 15, header: str = "id,breed,width,source",
                    row=lambda image_id, label: f"{image_id},{label},640,web") -> list[str]:
    """root/images/<id>.jpg and root/labels.csv naming them by id without extension, with extra columns; the
    last photo's row has no label, the last row names a missing image, and one image has no row. Returns the
    labelled ids."""
    photos = [(photo, name) for name in CLASSES for photo in sorted((CLOTHING / name).glob("*.jpg"))[:per_class]]
    lines, ids = [header], []
    for i, (photo, name) in enumerate(photos):
        _link(photo, root / "images" / f"{_image_id(photo)}.jpg")
        labelled = i < len(photos) - 1
        lines.append(row(_image_id(photo), name if labelled else ""))
        ids += [_image_id(photo)] if labelled else []
    lines.append(row("0000missing0000", "hat"))
    _link(sorted((CLOTHING / "skirt").glob("*.jpg"))[0], root / "images" / "no-row.jpg")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    return ids


def test_a_csv_labelled_folder_with_extra_columns_and_extension_less_ids_trains_its_labels(photos, tmp_path,
                                                                                           caplog):
    ids = labelled_folder(tmp_path / "data")
    config = tiny_config(tmp_path / "run", tmp_path / "data", "train.steps=20", "data.labels=labels.csv")
    with caplog.at_level("INFO", logger="runner"):
        _, outcome = _run(config)
    assert isinstance(outcome, Finished), outcome
    s = summary(tmp_path / "run")
    assert s["classes"] == list(CLASSES) and s["num_train"] + s["num_val"] + s["num_test"] == len(ids) == 44
    assert s["data_layout"]["layout"] == "labels" and s["data_layout"]["split_source"] == "hash"
    assert {"path": "0000missing0000", "reason": "labels.csv row 47: no such image file below data.dir"} \
        in s["skipped_images"]
    assert "label column 'breed'" in caplog.text and "image column 'id'" in caplog.text
    assert "1 row(s) of labels.csv have no label" in caplog.text
    assert "2 image file(s) below data.dir have no labelled row in labels.csv" in caplog.text


def test_a_split_column_is_honoured_and_columns_can_be_named(photos, tmp_path):
    splits = ["train", "train", "train", "val", "test"]
    counter = iter(range(10_000))
    labelled_folder(tmp_path / "data", header="file_name,annotator,kind,Split",
                    row=lambda image_id, label: f"images/{image_id}.jpg,ann,{label},{splits[next(counter) % 5]}")
    with pytest.raises(DataError, match="no label column found.*data.labels_columns"):
        _scan(tmp_path / "data", tmp_path, labels="labels.csv")
    dataset = _scan(tmp_path / "data", tmp_path, labels=str(tmp_path / "data" / "labels.csv"),
                    labels_columns="file_name,kind,split")
    assert dataset.classes == list(CLASSES)
    assert dataset.layout_json()["dataset_splits"] == {"train": 27, "validation": 9, "test": 8}
    assert len(dataset.split("validation")) == 9 and len(dataset.split("test")) == 8


def test_a_row_with_several_labels_is_refused(photos, tmp_path):
    labelled_folder(tmp_path / "data", row=lambda image_id, label: f"{image_id},{label};shoes,1,x")
    with pytest.raises(DataError, match=r"several labels .*multi-label classification is out of scope"):
        _scan(tmp_path / "data", tmp_path, labels="labels.csv")


def test_an_image_on_two_rows_with_different_labels_is_refused(photos, tmp_path):
    labelled_folder(tmp_path / "data")
    with (tmp_path / "data" / "labels.csv").open("a", encoding="utf-8") as f:
        f.write(f"{_image_id(sorted((CLOTHING / 'hat').glob('*.jpg'))[0])},pants,1,x\n")
    with pytest.raises(DataError, match="two labels \\('hat', 'pants'\\).*multi-label"):
        _scan(tmp_path / "data", tmp_path, labels="labels.csv")


def test_a_label_column_with_a_distinct_value_on_almost_every_row_is_refused_as_an_id(photos, tmp_path):
    counter = iter(range(10_000))
    labelled_folder(tmp_path / "data", header="image,label",
                    row=lambda image_id, label: f"{image_id}.jpg,{next(counter) if label else ''}")
    with pytest.raises(DataError, match="this looks like an id, not a label: set data.labels_columns"):
        _scan(tmp_path / "data", tmp_path, labels="labels.csv")


def test_a_label_changed_in_the_file_is_a_data_change(photos, tmp_path):
    from runner.run.dataversion import DataFingerprint
    labelled_folder(tmp_path / "data")
    before = DataFingerprint.of(_scan(tmp_path / "data", tmp_path, labels="labels.csv"))
    csv = tmp_path / "data" / "labels.csv"
    lines = csv.read_text(encoding="utf-8-sig").splitlines()
    lines[1] = lines[1].replace(",hat,", ",pants,")
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    after = DataFingerprint.of(_scan(tmp_path / "data", tmp_path, labels="labels.csv"))
    assert before.digest == after.digest and not before.same_data(after)


# -- accuracy on the dataset's own split -------------------------------------------------------------------------
def test_default_head_on_a_pre_split_clothing_tree_reaches_the_validation_tuned_logistic_regression(clothing_run,
                                                                                                    tmp_path):
    """The clothing photos dealt 60/20/20 into train/validation/test by their index (not the hash split: 377
    test images, one is 0.27 points); the cache of the shared run serves every vector. docs/benchmarks.md
    has this and two 80/10/10 deals."""
    _, shared_cache, _ = clothing_run
    data, counts = tmp_path / "data", {"train": 0, "validation": 0, "test": 0}
    for name in sorted(p.name for p in CLOTHING.iterdir() if p.is_dir()):
        for i, photo in enumerate(sorted((CLOTHING / name).glob("*.jpg"))):
            folder = "test" if i % 5 == 3 else "validation" if i % 5 == 1 else "train"
            _link(photo, data / folder / name / photo.name)
            counts[folder] += 1
    run_dir, cache_dir = tmp_path / "run", shutil.copytree(shared_cache, tmp_path / "cache")
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, data_dir=data))
    assert result.returncode == 0, result.stdout
    assert "0 vectors computed now, 1885 cached" in result.stdout
    s = summary(run_dir)
    assert s["data_layout"]["dataset_splits"] == counts and s["num_test"] == counts["test"]
    reference, c = logistic_regression_reference(run_dir, cache_dir)
    print(f"pre-split clothing: runner test accuracy {s['test_accuracy']:.4f}, logistic regression "
          f"{reference:.4f} (C = {c})")
    assert reference > 0.6 and s["test_accuracy"] >= reference - 0.01


def test_a_layout_setting_that_cannot_apply_is_named_in_a_warning():
    from runner.run.config import ignored_settings, load_config
    without_file = ignored_settings(load_config(None, ["data.dir=photos", "data.labels_columns=id,breed"]))
    assert any("data.labels_columns = 'id,breed' has no effect" in w and "data.labels is not set" in w
               for w in without_file)
    with_file = ignored_settings(load_config(None, ["data.dir=photos", "data.labels=l.csv", "data.layout=splits"]))
    assert any("data.layout = 'splits' has no effect" in w for w in with_file)
