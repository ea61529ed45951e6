"""report: learning curves, confusion matrix and misclassified images of a run, as files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, f"{path} is not a real plot"


def write_fake_run(run_dir: Path, num_classes: int, metrics: list[dict]) -> Path:
    """A run folder with metrics, labels and a test report, without any training."""
    run_dir.mkdir(parents=True)
    classes = [f"class_{i:02d}" for i in range(num_classes)]
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(5, 20, num_classes)) + rng.integers(0, 2, (num_classes, num_classes))
    misclassified = [{"path": f"{classes[1]}/a.jpg", "true": classes[1], "predicted": classes[2], "probability": 0.6},
                     {"path": f"{classes[0]}/b.jpg", "true": classes[0], "predicted": classes[1], "probability": 0.9}]
    (run_dir / "labels.json").write_text(json.dumps(classes))
    (run_dir / "test_report.json").write_text(json.dumps({"confusion_matrix": matrix.tolist(),
                                                          "misclassified": misclassified}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run_dir


def metric_line(step: int, stage: str | None = None) -> dict:
    line = {"step": step, "train_loss": 1 / step, "train_accuracy": 1 - 1 / step, "val_loss": 2 / step,
            "val_accuracy": 1 - 2 / step, "time": 0.0}
    return line if stage is None else dict(line, stage=stage)


def test_report_of_the_real_run_has_curves_confusion_and_misclassified(clothing_run, tmp_path):
    from runner.ui.report import main
    run_dir = Path(shutil.copytree(clothing_run[0], tmp_path / "run", ignore=shutil.ignore_patterns("tensorboard")))
    assert main(["--run", str(run_dir)]) == 0
    report = run_dir / "report"
    assert_png(report / "curves.png")
    assert_png(report / "confusion.png")
    test_report = json.loads((run_dir / "test_report.json").read_text())
    lines = (report / "misclassified.txt").read_text().splitlines()
    assert lines[0].startswith(f"{len(test_report['misclassified'])} misclassified test images")
    assert len(lines) == len(test_report["misclassified"]) + 2
    probabilities = [float(line.split("%")[0]) for line in lines[2:]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert "→" in (report / "top_confusions.txt").read_text()


def test_finetune_lines_that_continue_the_step_count_keep_their_steps():
    from runner.ui.report import curve_steps
    metrics = [metric_line(s, "head") for s in (100, 200)] + [metric_line(s, "finetune") for s in (300, 400)]
    steps, finetune_at = curve_steps(metrics)
    assert steps.tolist() == [100, 200, 300, 400] and finetune_at == 200
    assert curve_steps(metrics[:2])[1] is None
    assert curve_steps(metrics[2:])[1] == 300  # a report of fine-tune lines only


def test_report_with_a_finetune_stage_draws_its_start(tmp_path):
    from runner.ui.report import write_report
    metrics = [metric_line(s, "head") for s in range(100, 1001, 100)] + \
              [metric_line(s, "finetune") for s in range(1100, 1501, 100)]
    out = write_report(write_fake_run(tmp_path / "run", 5, metrics))
    assert_png(out / "curves.png")


def test_more_than_50_classes_lists_top_confusions_instead_of_a_picture(tmp_path):
    from runner.ui.report import write_report
    out = write_report(write_fake_run(tmp_path / "run", 60, [metric_line(100, "head"), metric_line(200, "head")]))
    assert not (out / "confusion.png").exists()
    lines = (out / "top_confusions.txt").read_text().splitlines()
    assert len(lines) == 31 and "→" in lines[1]
    assert (out / "misclassified.txt").read_text().splitlines()[2].endswith("class_00/b.jpg")


def test_report_of_an_unfinished_run_has_only_curves(tmp_path):
    from runner.ui.report import write_report
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps(metric_line(100, "head")) + "\n")
    out = write_report(run_dir)
    assert sorted(p.name for p in out.iterdir()) == ["curves.png"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "metrics.jsonl does not exist"),
])
def test_report_errors_name_the_missing_file(tmp_path, capsys, setup, message):
    from runner.ui.report import main
    run_dir = tmp_path / "run"
    setup(run_dir)
    assert main(["--run", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
