"""Plots and text reports of a run: learning curves, confusion matrix, misclassified test images.

    python -m runner.report --run RUN_DIR

Writes RUN_DIR/report/curves.png, candidates.png (the head search), confusion.png (up to 50 classes),
top_confusions.txt and misclassified.txt. Uses matplotlib's Agg canvas (no display needed); does not import TensorFlow.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.files import write_bytes_atomic, write_text_atomic
from common.cli import run_command
from runner.errors import RunnerError
from runner.run.records import TestReport
from runner.run.results import SearchSummary, Summary
from runner.run.rundir import RunDir

MAX_CONFUSION_CLASSES = 50
TOP_CONFUSIONS = 30


def curve_steps(metrics: list[dict]) -> tuple[np.ndarray, int | None]:
    """The (run-wide) step of each metric line and the step where fine-tuning starts (None if it never does)."""
    steps = np.array([m["step"] for m in metrics], dtype=np.int64)
    stages = [m["stage"] for m in metrics]
    if "finetune" not in stages:
        return steps, None
    head_steps = [s for s, stage in zip(steps, stages) if stage == "head"]
    return steps, int(max(head_steps) if head_steps else steps[stages.index("finetune")])


def _series(metrics: list[dict], key: str, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(x, m[key]) for x, m in zip(steps, metrics) if m.get(key) is not None]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=float)


def _save(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Training and validation accuracy and loss over steps, with the fine-tune start marked."""
    steps, finetune_at = curve_steps(metrics)
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    for axes, name in zip(figure.subplots(1, 2), ("accuracy", "loss")):
        for split, style in (("train", "-"), ("val", "--")):
            x, y = _series(metrics, f"{split}_{name}", steps)
            if len(x):
                axes.plot(x, y, style, marker="." if len(x) < 40 else None,
                          label="training" if split == "train" else "validation")
        if finetune_at is not None:
            axes.axvline(finetune_at, color="grey", linestyle=":", label="fine-tune starts")
        axes.set(title=name, xlabel="step", ylabel=name)
        if name == "accuracy":
            axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
        axes.legend()
    _save(figure, path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """The confusion matrix as a heat map (rows: true class, columns: predicted), counts written in."""
    n = len(classes)
    side = min(4 + 0.35 * n, 20)
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8, label="test images")
    axes.set_xticks(range(n), classes, rotation=90, fontsize=8 if n > 20 else 10)
    axes.set_yticks(range(n), classes, fontsize=8 if n > 20 else 10)
    axes.set(xlabel="predicted", ylabel="true", title="confusion matrix (test split)")
    if n <= 20:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", fontsize=8,
                          color="white" if count > threshold else "black")
    _save(figure, path)


def plot_candidates(search: SearchSummary, path: Path) -> None:
    """The head search: each candidate's best validation accuracy and loss, the chosen ones marked."""
    candidates, chosen = search.candidates, set(search.averaged or [search.selected])
    labels = [f"lr {c.learning_rate:g}, wd {c.weight_decay:.2g}" for c in candidates]
    colors = ["tab:orange" if i in chosen else "tab:blue" for i in range(len(candidates))]
    figure = Figure(figsize=(12, 3 + 0.22 * len(candidates)), layout="constrained")
    for axes, key, title in zip(figure.subplots(1, 2, sharey=True), ("best_val_accuracy", "best_val_loss"),
                                ("best validation accuracy", "best validation loss (chooses)")):
        values = [getattr(c, key) if getattr(c, key) is not None else np.nan for c in candidates]
        axes.barh(range(len(candidates)), values, color=colors)
        axes.set(title=title, yticks=range(len(candidates)))
        axes.set_yticklabels(labels, fontsize=8)
        axes.invert_yaxis()
        axes.grid(axis="x", alpha=0.3)
    figure.suptitle("head search (orange: in the exported head; status per candidate in summary.json)")
    _save(figure, path)


def confusion_entries(report: TestReport, num_classes: int) -> np.ndarray:
    """The non-zero confusion cells of a test report as rows (true, predicted, count); reads the sparse form
    written since the runner stores it so, and the dense n x n list of older runs."""
    matrix = report.confusion_matrix
    if isinstance(matrix, dict):
        entries = np.array(matrix["entries"], dtype=np.int64).reshape(-1, 3)
    else:
        dense = np.array(matrix, dtype=np.int64).reshape(num_classes, num_classes)
        true, predicted = np.nonzero(dense)
        entries = np.stack([true, predicted, dense[true, predicted]], axis=1)
    if len(entries) and (entries[:, :2].min() < 0 or entries[:, :2].max() >= num_classes):
        raise RunnerError(f"test_report.json's confusion matrix names a class index outside 0..{num_classes - 1} "
                          f"(labels.json has {num_classes} classes); re-run the evaluation of this run.")
    return entries


def dense_confusion(entries: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] as an n x n array (only for plotting a few classes)."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (entries[:, 0], entries[:, 1]), entries[:, 2])
    return matrix


def top_confusions(entries: np.ndarray, classes: list[str], limit: int = TOP_CONFUSIONS) -> list[str]:
    """The most frequent (true → predicted) mistakes, as text lines."""
    totals = np.bincount(entries[:, 0], weights=entries[:, 2], minlength=len(classes))
    mistakes = entries[entries[:, 0] != entries[:, 1]]
    order = np.lexsort((mistakes[:, 1], mistakes[:, 0], -mistakes[:, 2]))[:limit]
    lines = []
    for i, j, count in mistakes[order]:
        lines.append(f"{count:5d}  {classes[i]} → {classes[j]}  ({count / totals[i]:.0%} of {classes[i]})")
    return lines


def misclassified_text(misclassified: list[dict]) -> str:
    """misclassified.txt: the wrong test predictions, most confident first."""
    rows = sorted(misclassified, key=lambda m: -m["probability"])
    header = [f"{len(rows)} misclassified test images (most confident mistakes first)",
              "probability  true → predicted  path"]
    body = [f"{m['probability']:11.2%}  {m['true']} → {m['predicted']}  {m['path']}" for m in rows]
    return "\n".join(header + body) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report (curves, confusion, top confusions, misclassified) and return its path."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunnerError(f"run directory {run} does not exist; pass the run.dir of a run to --run.")
    metrics = run.metrics.read()
    if not metrics:
        raise RunnerError(f"{run.metrics.path} does not exist or is empty: there is nothing to plot until "
                          f"training has validated at least once (every eval.every_steps steps).")
    out = run.report
    out.mkdir(exist_ok=True)
    run.report_info_path.unlink(missing_ok=True)  # a kill while drawing leaves no claim of a complete report
    plot_curves(metrics, out / "curves.png")
    summary = run.read_summary()
    if summary is not None and summary.search is not None:
        plot_candidates(summary.search, out / "candidates.png")
    report = run.read_test_report()
    if report is None:
        return out  # training has not finished: curves only (no report.json: it describes finished results)
    classes = run.read_labels()
    entries = confusion_entries(report, len(classes))
    if len(classes) <= MAX_CONFUSION_CLASSES:
        plot_confusion(dense_confusion(entries, len(classes)), classes, out / "confusion.png")
    else:
        (out / "confusion.png").unlink(missing_ok=True)
    lines = top_confusions(entries, classes) or ["no test image was misclassified"]
    write_text_atomic(out / "top_confusions.txt", "count  true → predicted\n" + "\n".join(lines) + "\n")
    write_text_atomic(out / "misclassified.txt", misclassified_text(list(report.misclassified)))
    return _drawn(run, summary, metrics)


def _drawn(run: RunDir, summary: Summary | None, metrics: list[dict]) -> Path:
    """Record, last, which results the complete report shows: the summary's step and the last metrics step,
    so a finished run whose report is missing, half-drawn or of an older step is drawn again."""
    run.write_report_info(summary.global_step if summary is not None else None, metrics[-1].get("step"))
    return run.report


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m runner.report --run RUN_DIR."""
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="the run directory (run.dir)")
    args = parser.parse_args(argv)

    def command() -> int:
        print(f"report written to {write_report(args.run)}", flush=True)
        return 0
    return run_command(command)
