"""Bad bytes and bad files, each met in process: a clear refusal or a skip with a reason, never silent use."""
from __future__ import annotations

import ast
import errno
import io
import os
import pathlib
import shutil
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest

from common.files import write_text_atomic
from runner.features.cache import BottleneckCache
from runner.data.scan import HashIndex, problem_with, scan_dataset, split_of
from runner.errors import DataError, RunnerError
from runner.ui.progress import LineProgress
from tests.helpers import CLOTHING, MOBILENET_WEIGHTS, REPO

IDENTITY = {"backbone": "test", "weights": "none", "image_size": 8, "alpha": None}


def _keys(n: int, tag: str = "a") -> list[str]:
    return [f"{tag}{i:063d}" for i in range(n)]


def test_a_shard_with_flipped_bytes_of_the_same_size_is_set_aside_and_its_images_count_as_missing(tmp_path):
    cache = BottleneckCache(tmp_path, IDENTITY, 4)
    good = cache.add_shard(_keys(3, "a"), np.ones((3, 4), np.float32))
    bad = cache.add_shard(_keys(3, "b"), np.full((3, 4), 2.0, np.float32))
    raw = bytearray(bad.read_bytes())
    raw[-5] ^= 0xFF  # a vector byte: the shape and size are unchanged
    bad.write_bytes(bytes(raw))

    reopened = BottleneckCache(tmp_path, IDENTITY, 4)
    assert len(reopened) == 3 and reopened.has(_keys(1, "a")[0]) and not reopened.has(_keys(1, "b")[0])
    assert good.exists() and not bad.exists() and bad.with_suffix(".corrupt").exists()
    assert isinstance(reopened.shards[0], np.memmap), "vectors must stay memory-mapped"


def test_an_unreadable_image_is_skipped_and_listed_not_fatal(tmp_path, monkeypatch):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            shutil.copy(next((CLOTHING / "hat").glob("*.jpg")), tmp_path / cls / f"{cls}{i}.jpg")
    locked = tmp_path / "a" / "a2.jpg"
    real_read = pathlib.Path.read_bytes

    def read_bytes(self):  # the tests run as root, where chmod 000 does not stop a read
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    dataset = scan_dataset(tmp_path, 0, 0, HashIndex(tmp_path / "h.json"), 1, "lines")
    assert len(dataset.images) == 11
    assert dataset.skipped == [{"path": "a/a2.jpg", "reason": "unreadable: Permission denied; fix its permissions"}]


def test_a_jpeg_with_bytes_after_its_end_marker_is_left_to_the_decoder():
    good = next((CLOTHING / "hat").glob("*.jpg")).read_bytes()
    trailing = good + b"\x00trailing data some cameras append" * 200  # more than 1 KiB after the end marker
    assert problem_with(trailing, ".jpg") is None
    import tensorflow as tf
    assert tf.io.decode_image(trailing, channels=3).shape[-1] == 3  # and TensorFlow does decode it
    assert "truncated JPEG" in problem_with(good[: len(good) // 2], ".jpg")


def test_a_class_with_no_training_image_is_refused_by_name(tmp_path):
    photo = next((CLOTHING / "hat").glob("*.jpg"))
    for i in range(6):
        (tmp_path / "common").mkdir(exist_ok=True)
        shutil.copy(photo, tmp_path / "common" / f"c{i}.jpg")
    name = next(f"only{i}.jpg" for i in range(1000) if split_of(f"rare/only{i}.jpg", 10, 10) == "test")
    (tmp_path / "rare").mkdir()
    shutil.copy(photo, tmp_path / "rare" / name)
    with pytest.raises(DataError, match="'rare' have no image in the training split"):
        scan_dataset(tmp_path, 10, 10, HashIndex(tmp_path / "h.json"), 1, "lines")


def test_disk_full_is_a_fixable_error_naming_the_path(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    from common.errors import EXIT_USER_ERROR, status_of
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        write_text_atomic(tmp_path / "summary.json", "{}")
    code, message = status_of(caught.value)
    assert code == EXIT_USER_ERROR
    assert str(tmp_path / "summary.json") in message and "full" in message
    assert not list(tmp_path.iterdir()), "the temp file is removed"


def test_a_disk_full_while_renaming_a_download_into_place_names_it_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    from common.errors import EXIT_USER_ERROR, status_of
    from common.files import replace_atomic
    (tmp_path / "shard.npy").write_bytes(b"old")
    (tmp_path / ".shard.npy.download").write_bytes(b"new")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        replace_atomic(tmp_path / ".shard.npy.download", tmp_path / "shard.npy")
    code, message = status_of(caught.value)
    assert code == EXIT_USER_ERROR and str(tmp_path / "shard.npy") in message and "full" in message
    assert (tmp_path / "shard.npy").read_bytes() == b"old"


def test_a_damaged_weights_file_is_refused_naming_backbone_weights(tmp_path):
    from runner.features.backbones import build_backbone
    from runner.run.config import BackboneConfig
    raw = bytearray(MOBILENET_WEIGHTS.read_bytes())
    start = len(raw) // 100  # HDF5 metadata: h5py raises RuntimeError ("wrong B-tree signature") here
    raw[start:start + 512] = bytes(b ^ 0xFF for b in raw[start:start + 512])
    damaged = tmp_path / "weights.h5"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(RunnerError, match="backbone.weights"):
        build_backbone(BackboneConfig(name="mobilenet", weights=str(damaged), image_size=224, alpha=0.25))


def test_weights_of_another_width_say_so_in_one_sentence():
    from runner.features.backbones import build_backbone
    from runner.run.config import BackboneConfig
    with pytest.raises(RunnerError) as caught:
        build_backbone(BackboneConfig(name="mobilenet", weights=str(MOBILENET_WEIGHTS), image_size=224, alpha=0.5))
    assert ".." not in str(caught.value) and "backbone.weights" in str(caught.value)


def test_line_progress_shows_no_rate_for_the_first_item_and_the_last_line_once():
    out = io.StringIO()
    with redirect_stdout(out):
        bar = LineProgress(3, "extracting bottlenecks", "img")
        bar.update()
        bar.update(2)
        bar.update(0)  # the extraction adds its undecodable images at the end, often none
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "extracting bottlenecks: 1/3 (started)" and lines[1].startswith("extracting bottlenecks: 3/3 (")


def test_resume_py_parses_on_old_pythons_and_refuses_them_by_name():
    source = (REPO / "resume.py").read_text()
    ast.parse(source, feature_version=(3, 6))
    fake_old = ("import sys; sys.version_info = (3, 10, 4); sys.argv = ['resume.py', '--help']; "
                f"exec(compile(open({str(REPO / 'resume.py')!r}).read(), 'resume.py', 'exec'))")
    result = subprocess.run([sys.executable, "-c", fake_old], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "needs Python 3.11 or newer; this is Python 3.10" in result.stderr and "Traceback" not in result.stderr


def test_labels_that_do_not_match_the_model_are_refused(finished_run, tmp_path, capsys):
    from runner.export.classify import main
    from common.errors import EXIT_USER_ERROR
    run_dir = finished_run[0]
    export = shutil.copytree(run_dir / "export", tmp_path / "export")
    labels = (export / "labels.txt").read_text().splitlines()
    (export / "labels.txt").write_text("".join(f"{name}\n" for name in labels[:-1]))
    photo = next((run_dir / "export").glob("*.json"))  # any file: the model is refused before any input
    assert main([str(export), str(photo)]) == EXIT_USER_ERROR
    assert "labels.txt names 2 classes but the model has 3 outputs" in capsys.readouterr().err
