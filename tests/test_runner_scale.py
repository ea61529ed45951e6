"""Nothing assumes few classes or one device."""
from __future__ import annotations

import json

import numpy as np

from tests.helpers import (checkpoint_values, latest_checkpoint_prefix, local_mobilenet_args, run_resume, summary,
                           write_synthetic_dataset)


def test_two_hundred_and_fifty_classes_train_and_report(shared_assets, tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_classes=250, per_class=6, size=48)
    run_dir = tmp_path / "run"
    result = run_resume(*local_mobilenet_args(run_dir, None, "backbone.image_size=128", "train.steps=600",
                                              "data.min_images_per_class=6", "split.validation_percent=15",
                                              "split.test_percent=15", data_dir=data))
    assert result.returncode == 0, result.stdout
    s = summary(run_dir)
    assert s["num_classes"] == 250 and len(json.loads((run_dir / "labels.json").read_text())) == 250
    assert s["num_train"] + s["num_val"] + s["num_test"] == 1500
    report = json.loads((run_dir / "test_report.json").read_text())
    assert report["confusion_matrix"]["num_classes"] == 250
    assert report["confusion_matrix"]["entries"] and all(len(cell) == 3 for cell in report["confusion_matrix"]["entries"])
    weights = checkpoint_values(latest_checkpoint_prefix(run_dir))
    assert any(v.shape == (256, 250) for v in weights.values())
    print("250-class synthetic test accuracy", s["test_accuracy"])
    assert s["test_accuracy"] > 10 / 250, "should be far above chance (0.4 %)"


def test_mirrored_strategy_on_two_logical_cpus_matches_the_default_strategy(shared_assets, tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_classes=4, per_class=12, size=64)
    common = ("backbone.image_size=128", "train.steps=60", "eval.every_steps=20", "cache.batch_size=8",
              "head.hidden_units=16", "data.min_images_per_class=3", "head.search=off")
    runs = {}
    for name, extra in (("default", ()), ("mirrored", ("train.strategy=mirrored", "train.cpu_devices=2"))):
        run_dir = tmp_path / name
        result = run_resume(*local_mobilenet_args(run_dir, tmp_path / f"cache-{name}", *common, *extra,
                                                  data_dir=data))
        assert result.returncode == 0, result.stdout
        runs[name] = checkpoint_values(latest_checkpoint_prefix(run_dir))
    from runner.features.cache import BottleneckCache
    vectors = {}
    for name in runs:
        identity = json.loads(next((tmp_path / f"cache-{name}").glob("*/identity.json")).read_text())
        cache = BottleneckCache(tmp_path / f"cache-{name}", {k: v for k, v in identity.items() if k != "dim"},
                                identity["dim"])
        vectors[name] = {k: cache.table([k.decode()]).all()[0] for k in cache.index}
    assert vectors["default"].keys() == vectors["mirrored"].keys() and len(vectors["default"]) == 48
    for key, vector in vectors["default"].items():
        np.testing.assert_allclose(vectors["mirrored"][key], vector, atol=2e-2, rtol=1e-2)
    assert runs["default"].keys() == runs["mirrored"].keys()
    for name, value in runs["default"].items():
        np.testing.assert_allclose(runs["mirrored"][name], value, atol=2e-3, rtol=1e-3, err_msg=name)


def test_the_head_search_trains_on_one_device_under_mirrored_strategy(shared_assets, tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_classes=4, per_class=12, size=64)
    common = ("backbone.image_size=128", "train.steps=40", "cache.batch_size=8", "data.min_images_per_class=3")
    runs = {}
    for name, extra in (("default", ()), ("mirrored", ("train.strategy=mirrored", "train.cpu_devices=2"))):
        result = run_resume(*local_mobilenet_args(tmp_path / name, tmp_path / "cache", *common, *extra,
                                                  data_dir=data))
        assert result.returncode == 0, result.stdout
        assert "selected" in summary(tmp_path / name)
        runs[name] = checkpoint_values(latest_checkpoint_prefix(tmp_path / name))
    assert runs["default"].keys() == runs["mirrored"].keys()
    for name, value in runs["default"].items():
        assert np.array_equal(runs["mirrored"][name], value), name
