"""Real accuracy on real photos and real ImageNet weights, against a reference fitted on the same cache."""
from __future__ import annotations

import json

import pytest

from tests.helpers import (local_mobilenet_args, logistic_regression_reference, run_resume, summary,
                           write_many_class_dataset)


def test_default_head_reaches_the_validation_tuned_logistic_regression_on_clothing(clothing_run):
    run_dir, cache_dir, output = clothing_run
    reference, c = logistic_regression_reference(run_dir, cache_dir)
    accuracy = summary(run_dir)["test_accuracy"]
    print(f"clothing: runner test accuracy {accuracy:.4f}, logistic regression {reference:.4f} (C = {c})")
    assert reference > 0.6, "the reference itself should be far above chance on real ImageNet features"
    assert accuracy >= reference - 0.01


@pytest.mark.slow
def test_default_head_reaches_the_reference_on_a_120_class_set(shared_assets, tmp_path):
    data = write_many_class_dataset(tmp_path / "data")
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, data_dir=data))
    assert result.returncode == 0, result.stdout
    reference, c = logistic_regression_reference(run_dir, cache_dir)
    s = summary(run_dir)
    print(f"120 classes: runner test accuracy {s['test_accuracy']:.4f}, logistic regression {reference:.4f} "
          f"(C = {c}); selected {s['selected']}")
    assert s["num_classes"] == 120 and 0.2 < reference < 0.9, "learnable, not trivial"
    assert s["test_accuracy"] >= reference - 0.01


def test_the_search_is_visible_in_summary_log_and_report(clothing_run):
    run_dir, _, output = clothing_run
    s = summary(run_dir)
    assert len(s["candidates"]) == 20
    rates = {c["learning_rate"] for c in s["candidates"]}
    assert max(rates) / min(rates) >= 30 and 0.0 in {c["weight_decay"] for c in s["candidates"]}
    chosen = s["candidates"][s["selected"]["candidate"]]
    assert s["selected"]["best_val_loss"] == min(c["best_val_loss"] for c in s["candidates"]) == chosen["best_val_loss"]
    assert 0 < s["selected"]["best_step"] <= s["global_step"]
    assert "head search: learning rate" in output and "chosen from 20 candidates" in output
    assert (run_dir / "report" / "candidates.png").stat().st_size > 10_000


def test_summary_has_the_promised_fields(clothing_run):
    run_dir, _, output = clothing_run
    result = summary(run_dir)
    for key in ("test_accuracy", "val_accuracy", "global_step", "num_classes", "num_train", "num_val",
                "num_test", "backbone", "resumed_from", "skipped_images", "selected", "candidates"):
        assert key in result, key
    assert result["num_classes"] == 10
    assert result["num_train"] + result["num_val"] + result["num_test"] == 1885
    assert result["global_step"] == result["head_steps"] <= 1600 and result["resumed_from"] == []
    assert result["backbone"]["name"] == "mobilenet" and result["backbone"]["feature_dim"] == 256
    report = json.loads((run_dir / "test_report.json").read_text())
    from runner.ui.report import confusion_entries
    assert report["confusion_matrix"]["num_classes"] == 10
    from runner.run.records import TestReport
    assert confusion_entries(TestReport.from_json(report), 10)[:, 2].sum() == result["num_test"]
    assert len(report["misclassified"]) == round(result["num_test"] * (1 - result["test_accuracy"]))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = -(-result["num_train"] // 100)
    assert [x["step"] for x in lines] == list(range(steps_per_epoch, result["global_step"] + 1, steps_per_epoch))
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())


def test_search_off_trains_exactly_the_configured_head(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    run_dir = tmp_path / "run"
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, "head.search=off", "train.steps=120",
                                              "eval.every_steps=40", "head.weight_decay=0.001"))
    assert result.returncode == 0, result.stdout
    s = summary(run_dir)
    assert s["global_step"] == 120 and "selected" not in s and "head search" not in result.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [40, 80, 120]


def test_without_a_validation_split_the_configured_head_is_trained_with_a_warning(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    run_dir = tmp_path / "run"
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, "split.validation_percent=0",
                                              "train.steps=50"))
    assert result.returncode == 0, result.stdout
    assert "head.search = auto needs validation images" in result.stdout
    assert "selected" not in summary(run_dir) and summary(run_dir)["global_step"] == 50


def test_second_run_with_the_same_cache_extracts_nothing(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    result = run_resume(*local_mobilenet_args(tmp_path / "run", cache_dir, "train.steps=10"))
    assert result.returncode == 0, result.stdout
    assert "0 vectors computed now, 1885 cached" in result.stdout
    assert "extracting bottlenecks" not in result.stdout
