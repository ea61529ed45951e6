"""Real accuracy on real photos and real ImageNet weights, against a reference fitted on the same cache."""
from __future__ import annotations

import json

from sklearn.linear_model import LogisticRegression

from tests.helpers import cached_split, summary


def test_default_head_is_within_3_points_of_logistic_regression_on_clothing(clothing_run):
    run_dir, cache_dir, output = clothing_run
    result = summary(run_dir)
    train_x, train_y, _ = cached_split(run_dir, cache_dir, "train")
    test_x, test_y, _ = cached_split(run_dir, cache_dir, "test")
    assert len(test_y) == result["num_test"] and len(train_y) == result["num_train"]
    reference = LogisticRegression(max_iter=5000).fit(train_x, train_y).score(test_x, test_y)
    print(f"runner test accuracy {result['test_accuracy']:.4f}, logistic regression {reference:.4f}")
    assert reference > 0.6, "the reference itself should be far above chance on real ImageNet features"
    assert result["test_accuracy"] >= reference - 0.03


def test_summary_has_the_promised_fields(clothing_run):
    run_dir, _, output = clothing_run
    result = summary(run_dir)
    for key in ("test_accuracy", "val_accuracy", "global_step", "num_classes", "num_train", "num_val",
                "num_test", "backbone", "resumed_from", "skipped_images"):
        assert key in result, key
    assert result["num_classes"] == 10
    assert result["num_train"] + result["num_val"] + result["num_test"] == 1885
    assert result["global_step"] == 4000 and result["resumed_from"] == []
    assert result["backbone"]["name"] == "mobilenet" and result["backbone"]["feature_dim"] == 256
    report = json.loads((run_dir / "test_report.json").read_text())
    from runner.report import confusion_entries
    assert report["confusion_matrix"]["num_classes"] == 10
    assert confusion_entries(report, 10)[:, 2].sum() == result["num_test"]
    assert len(report["misclassified"]) == round(result["num_test"] * (1 - result["test_accuracy"]))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(200, 4001, 200))
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())


def test_second_run_with_the_same_cache_extracts_nothing(clothing_run, tmp_path):
    from tests.helpers import local_mobilenet_args, run_resume
    _, cache_dir, _ = clothing_run
    result = run_resume(*local_mobilenet_args(tmp_path / "run", cache_dir, "train.steps=10"))
    assert result.returncode == 0, result.stdout
    assert "0 vectors computed now, 1885 cached" in result.stdout
    assert "extracting bottlenecks" not in result.stdout
