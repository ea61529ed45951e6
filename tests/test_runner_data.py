"""Data: stable hash split, image checks, bad files skipped and listed, never fatal."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runner.data.scan import HashIndex, problem_with, scan_dataset, split_of
from runner.errors import DataError
from tests.helpers import CLOTHING, local_mobilenet_args, run_resume, summary


def test_split_follows_retrain_py_and_ignores_nohash_suffix():
    names = [f"photo_{i}.jpg" for i in range(2000)]
    splits = [split_of(n, 10, 10) for n in names]
    for name, expected in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert abs(splits.count(name) / len(names) - expected) < 0.03
    assert split_of("dog_nohash_1.jpg", 10, 10) == split_of("dog_nohash_2.jpg", 10, 10) == split_of("dog", 10, 10)


def test_adding_and_removing_images_never_moves_the_others(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(30):
            shutil.copy(next((CLOTHING / "hat").glob("*.jpg")), tmp_path / cls / f"{cls}{i}.jpg")
    before = {r.relpath: r.split for r in scan_dataset(tmp_path, 20, 20, HashIndex(tmp_path / "h.json"), 1,
                                                       "lines").images}
    (tmp_path / "a" / "a3.jpg").unlink()
    for i in range(30, 60):
        shutil.copy(next((CLOTHING / "hat").glob("*.jpg")), tmp_path / "b" / f"b{i}.jpg")
    after = {r.relpath: r.split for r in scan_dataset(tmp_path, 20, 20, HashIndex(tmp_path / "h.json"), 1,
                                                      "lines").images}
    assert all(after[k] == v for k, v in before.items() if k in after)
    assert len(after) == len(before) - 1 + 30


@pytest.mark.parametrize("data, ext, reason", [
    (b"", ".jpg", "empty file"),
    (b"hello, I am text", ".jpg", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"x" * 100 + b"IEND\xaeB`\x82", ".jpg", "mislabelled"),
    (b"\xff\xd8\xff\xe0" + b"x" * 5000, ".jpeg", "truncated JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"x" * 100, ".png", "truncated PNG"),
])
def test_bad_files_are_named_with_a_reason(data, ext, reason):
    assert reason in problem_with(data, ext)


def test_a_class_with_too_few_images_fails_early_naming_it(tmp_path):
    for cls, count in (("plenty", 8), ("scarce", 2)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            shutil.copy(next((CLOTHING / "hat").glob("*.jpg")), tmp_path / cls / f"{i}.jpg")
    with pytest.raises(DataError, match="'scarce' has 2.*at least 5"):
        scan_dataset(tmp_path, 10, 10, HashIndex(tmp_path / "h.json"), 5, "lines")


def make_dataset_with_bad_files(root: Path) -> dict[str, str]:
    """Three real classes plus one bad file of every kind; returns the bad file → expected reason."""
    import numpy as np
    import tensorflow as tf
    for name in ("dress", "hat", "pants"):
        (root / name).mkdir(parents=True)
        for src in sorted((CLOTHING / name).glob("*.jpg"))[:15]:
            shutil.copy(src, root / name / src.name)
    good = next((CLOTHING / "hat").glob("*.jpg")).read_bytes()
    png = tf.io.encode_png(np.full((40, 40, 3), 128, np.uint8)).numpy()
    bad = {
        "dress/empty.jpg": (b"", "empty file"),
        "dress/notes.JPG": (b"shopping list: milk, eggs", "not an image"),
        "hat/half.jpg": (good[: len(good) // 2], "truncated JPEG"),
        "hat/really_a_png.jpg": (png, "mislabelled"),
        "pants/garbage.jpeg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9", "undecodable"),
    }
    for rel, (data, _) in bad.items():
        (root / rel).write_bytes(data)
    (root / "pants" / "fine.png").write_bytes(png)  # a real PNG is used, not skipped
    (root / "pants" / "readme.txt").write_text("not an image extension: ignored entirely")
    return {rel: reason for rel, (_, reason) in bad.items()}


def test_bad_images_mixed_into_a_dataset_are_skipped_and_listed(shared_assets, tmp_path):
    expected = make_dataset_with_bad_files(tmp_path / "data")
    run_dir = tmp_path / "run"
    result = run_resume(*local_mobilenet_args(run_dir, None, "train.steps=50", "eval.every_steps=25",
                                              data_dir=tmp_path / "data"))
    assert result.returncode == 0, result.stdout
    skipped = {item["path"]: item["reason"] for item in summary(run_dir)["skipped_images"]}
    assert skipped.keys() == expected.keys()
    for path, reason in expected.items():
        assert reason in skipped[path], (path, skipped[path])
    s = summary(run_dir)
    assert s["num_train"] + s["num_val"] + s["num_test"] == 46  # 45 good JPEGs + the PNG
