"""Datasets as their libraries ship them: `data.dir = "tfds:NAME"` (TensorFlow Datasets, loaded by name from
TFDS_DATA_DIR) and `data.dir = "hf:PATH"` (Hugging Face datasets, here a save_to_disk folder). Their classes and
own splits, encoded bytes extracted and cached like files (rerun: nothing; kill: the rest; more examples: a new
data version extracting only those), unusable examples listed by split and index, clear refusals and exit
statuses. Nothing is downloaded: the TFDS dataset is built with TFDS's own builder API from the clothing photos."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import status_of
from runner.run.results import Finished, Unchanged
from tests.helpers import (CLOTHING, REPO, child_env, local_mobilenet_args, run_resume, sigkill_once_shards, summary)
from tests.test_job import RecordingSync, tiny_config

CLASSES = ["hat", "pants", "shoes"]
TFDS_NAME = "tiny_clothing"


def photos(name: str, start: int, count: int) -> list[Path]:
    return sorted((CLOTHING / name).glob("*.jpg"))[start:start + count]


def build_tfds(data_dir: Path, version: str, train: int, validation: int = 3, test: int = 3) -> None:
    """Write TFDS_NAME at `version` into data_dir with TFDS's builder API: per class `train` / `validation` /
    `test` clothing photos, stored as their JPEG bytes."""
    import tensorflow_datasets as tfds
    sizes = {"train": (0, train), "validation": (60, validation), "test": (80, test)}

    with tfds.core.registered.skip_registration():  # loaded later by name, from the files alone
        class TinyClothing(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=CLASSES)}), supervised_keys=("image", "label"))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(*sizes[split]) for split in sizes}

            def _generate_examples(self, start, count):
                for label, name in enumerate(CLASSES):
                    for path in photos(name, start, count):
                        yield f"{name}/{path.name}", {"image": str(path), "label": label}
    TinyClothing(data_dir=str(data_dir)).download_and_prepare()


def save_hf(folder: Path, train: int, bad_rows: int = 0, splits=("train", "valid", "test")) -> Path:
    """A DatasetDict (Image + ClassLabel + another column) saved with save_to_disk: per class `train` photos in
    train, 3 in `valid`, 3 in test; `bad_rows` rows of train that are no image."""
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "source": datasets.Value("string")})

    def rows(start, count, bad=0):
        table = {"image": [], "label": [], "source": []}
        for label, name in enumerate(CLASSES):
            for path in photos(name, start, count):
                table["image"].append({"bytes": path.read_bytes(), "path": None})
                table["label"].append(label)
                table["source"].append(path.name)
        for i in range(bad):
            table["image"].append({"bytes": b"not an image %d" % i, "path": None})
            table["label"].append(0)
            table["source"].append("garbage")
        return datasets.Dataset.from_dict(table, features=features)
    parts = {"train": rows(0, train, bad_rows), "valid": rows(60, 3), "test": rows(80, 3)}
    if folder.exists():
        shutil.rmtree(folder)
    datasets.DatasetDict({name: parts[name] for name in splits}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    build_tfds(data_dir, "1.0.0", train=8)
    return data_dir


@pytest.fixture
def tfds_env(tfds_data_dir, tmp_path, monkeypatch) -> Path:
    """This test's own TFDS_DATA_DIR holding TFDS_NAME 1.0.0."""
    data_dir = shutil.copytree(tfds_data_dir, tmp_path / "tfds")
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf") / "saved", train=8, bad_rows=1)


def _run(config):
    from runner.job import Job
    job = Job(config, RecordingSync())
    return job, job.run()


def _check_first_run(config, outcome, job, train: int):
    assert isinstance(outcome, Finished), outcome
    s = outcome.summary
    assert s.classes == CLASSES
    assert (s.num_train, s.num_val, s.num_test) == (3 * train, 9, 9), "the dataset's own splits"
    assert job.prepared.computed == 3 * train + 18, "every usable example extracted once"
    job, again = _run(config)
    assert isinstance(again, Unchanged) and job.prepared.computed == 0, "a rerun extracts nothing"


def test_a_tfds_dataset_is_loaded_by_name_with_its_classes_and_its_own_splits(tfds_env, tmp_path):
    config = tiny_config(tmp_path / "run", f"tfds:{TFDS_NAME}", "train.steps=20")
    job, outcome = _run(config)
    _check_first_run(config, outcome, job, train=8)


def test_a_hf_dataset_saved_to_disk_is_loaded_with_its_splits_and_unusable_rows_listed_by_split_and_index(
        hf_saved, tmp_path):
    config = tiny_config(tmp_path / "run", f"hf:{hf_saved}", "train.steps=20")
    job, outcome = _run(config)
    _check_first_run(config, outcome, job, train=8)
    skipped = outcome.summary.skipped_images
    assert [item["path"] for item in skipped] == ["train/24"], "the garbage row, by split and index"
    assert "not an image" in skipped[0]["reason"]


def test_more_tfds_examples_in_a_new_version_start_a_new_data_version_extracting_only_them(tfds_env, tmp_path):
    config = tiny_config(tmp_path / "run", f"tfds:{TFDS_NAME}", "train.steps=20")
    _, first = _run(config)
    assert isinstance(first, Finished) and first.summary.data_version == 1
    build_tfds(tfds_env, "1.1.0", train=10)  # 2 more training photos per class; tfds:NAME reads the newest
    job, outcome = _run(config)
    assert isinstance(outcome, Finished), outcome
    assert outcome.summary.data_version == 2 and outcome.summary.num_train == 30
    assert job.prepared.computed == 6, "only the new examples go through the CNN"


def test_more_hf_rows_start_a_new_data_version_extracting_only_them(tmp_path):
    saved = save_hf(tmp_path / "saved", train=8)
    config = tiny_config(tmp_path / "run", f"hf:{saved}", "train.steps=20")
    _, first = _run(config)
    assert isinstance(first, Finished) and first.summary.data_version == 1
    save_hf(saved, train=11)
    job, outcome = _run(config)
    assert isinstance(outcome, Finished), outcome
    assert outcome.summary.data_version == 2 and outcome.summary.num_train == 33
    assert job.prepared.computed == 9, "only the new rows go through the CNN"


def test_a_dataset_with_only_a_train_split_carves_validation_and_test_out_by_content_hash(tmp_path):
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    saved = save_hf(tmp_path / "saved", train=40, splits=("train",))
    config = tiny_config(tmp_path / "run", f"hf:{saved}", "split.validation_percent=20",
                         "split.test_percent=20")
    dataset = scan_library(config, HashIndex(tmp_path / "hashes.json"))
    counts = {name: len(dataset.split(name)) for name in ("train", "validation", "test")}
    assert sum(counts.values()) == 120 and all(counts.values()), counts
    again = scan_library(config, HashIndex(tmp_path / "hashes.json"))
    assert [(r.relpath, r.split) for r in again.images] == [(r.relpath, r.split) for r in dataset.images]


def test_a_tfds_name_that_does_not_exist_is_a_user_error_naming_the_catalog(tfds_env, tmp_path):
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    config = tiny_config(tmp_path / "run", "tfds:no_such_dataset_anywhere")
    with pytest.raises(Exception) as raised:
        scan_library(config, HashIndex(tmp_path / "hashes.json"))
    status, message = status_of(raised.value)
    assert status == 2 and "no_such_dataset_anywhere" in message and "catalog" in message


def test_the_hub_unreachable_is_transient(tmp_path, monkeypatch):
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache ...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                # ... and no network
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    config = tiny_config(tmp_path / "run", "hf:someone/some-images")
    with pytest.raises(Exception) as raised:
        scan_library(config, HashIndex(tmp_path / "hashes.json"))
    assert status_of(raised.value)[0] == 75, raised.value


def test_a_damaged_prepared_tfds_file_is_a_user_error_naming_the_folder_to_delete(tfds_env, tmp_path):
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    record = next(tfds_env.rglob("*-train.tfrecord-*"))
    raw = bytearray(record.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    record.write_bytes(bytes(raw))
    with pytest.raises(Exception) as raised:
        scan_library(tiny_config(tmp_path / "run", f"tfds:{TFDS_NAME}"), HashIndex(tmp_path / "hashes.json"))
    status, message = status_of(raised.value)
    assert status == 2 and "'train'" in message and f"delete {record.parent}" in message, message


def test_tfds_download_hosts_unreachable_is_transient(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))  # tf_flowers not prepared here

    def no_network(self, *args, **kwargs):  # what TFDS's downloader raises without a connection
        raise ConnectionError("Failed to resolve 'download.tensorflow.org' ([Errno -2] Name or service not known)")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(Exception) as raised:
        scan_library(tiny_config(tmp_path / "run", "tfds:tf_flowers"), HashIndex(tmp_path / "hashes.json"))
    assert status_of(raised.value)[0] == 75, raised.value


def test_a_local_imagefolder_with_train_and_test_folders_carves_validation_out_of_train(tmp_path, monkeypatch):
    import datasets
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # load_dataset prepares here
    for split, start, count in (("train", 0, 20), ("test", 80, 4)):
        for name in CLASSES:
            (tmp_path / "folder" / split / name).mkdir(parents=True)
            for path in photos(name, start, count):
                shutil.copy(path, tmp_path / "folder" / split / name / path.name)
    config = tiny_config(tmp_path / "run", f"hf:{tmp_path / 'folder'}", "split.validation_percent=25")
    dataset = scan_library(config, HashIndex(tmp_path / "hashes.json"))
    assert dataset.classes == CLASSES
    counts = {name: len(dataset.split(name)) for name in ("train", "validation", "test")}
    assert counts["test"] == 12 and counts["train"] + counts["validation"] == 60 and counts["validation"], counts


@pytest.mark.parametrize("module, spec", [("tensorflow_datasets", "tfds:tf_flowers"), ("datasets", "hf:beans")])
def test_a_missing_library_names_the_requirements_file(module, spec, tmp_path, monkeypatch):
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    with pytest.raises(Exception) as raised:
        scan_library(tiny_config(tmp_path / "run", spec), HashIndex(tmp_path / "hashes.json"))
    status, message = status_of(raised.value)
    assert status == 2 and "pip install -r requirements-datasets.txt" in message


def test_fine_tuning_and_beam_refuse_a_library_dataset_naming_it(hf_saved, tmp_path):
    from runner.data.libraries import scan_library
    from runner.data.scan import HashIndex
    from runner.features.beam import extract_with_beam
    config = tiny_config(tmp_path / "run", f"hf:{hf_saved}", "fine_tune.enabled=true")
    with pytest.raises(Exception) as raised:
        scan_library(config, HashIndex(tmp_path / "hashes.json"))
    status, message = status_of(raised.value)
    assert status == 2 and f"hf:{hf_saved}" in message and "fine_tune.enabled = false" in message
    with pytest.raises(Exception) as raised:
        extract_with_beam(tiny_config(tmp_path / "run", f"hf:{hf_saved}"), [])
    status, message = status_of(raised.value)
    assert status == 2 and f"hf:{hf_saved}" in message and "Beam" in message


def _kill_during_extraction(args: list[str], cache_dir: Path) -> int:
    """Start resume.py ARGS, SIGKILL it once two cache shards are written; how many vectors were cached."""
    sigkill_once_shards(args, cache_dir, 2)
    shards = sorted(cache_dir.glob("*/shard-*.npy"))
    assert len(shards) >= 2
    import numpy as np
    return sum(len(np.load(shard, mmap_mode="r")) for shard in shards)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tfds", "hf"])
def test_kill_during_extraction_then_the_same_command_extracts_only_the_rest_and_exports_a_classifier(
        source, tmp_path, monkeypatch):
    if source == "tfds":
        build_tfds(tmp_path / "tfds", "1.0.0", train=20, validation=5, test=5)
        monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
        data_dir = f"tfds:{TFDS_NAME}"
    else:
        data_dir = f"hf:{save_hf(tmp_path / 'saved', train=24)}"
    total = 90  # 3 classes x 30 photos
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    args = local_mobilenet_args(run_dir, cache_dir, "cache.shard_size=2", "cache.batch_size=2", "train.steps=20",
                                data_dir=data_dir, export=True)
    cached = _kill_during_extraction(args, cache_dir)
    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    line = next(x for x in result.stdout.splitlines() if "extracting bottlenecks for" in x)
    todo = int(line.split("for ")[1].split(" images")[0])
    assert todo == total - cached and 0 < todo < total, line
    assert summary(run_dir)["classes"] == CLASSES
    photo = photos("shoes", 100, 1)[0]
    classified = subprocess.run([sys.executable, "-m", "runner.classify", str(run_dir), str(photo)], cwd=REPO,
                                env=child_env(), capture_output=True, text=True, timeout=300)
    assert classified.returncode == 0, classified.stderr
    assert f"{photo}\n" in classified.stdout and any(f"  {name} " in classified.stdout for name in CLASSES)
