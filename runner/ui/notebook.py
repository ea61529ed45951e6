"""What the Colab quickstart notebook shows: environment, dataset download, sample images, run status,
results and predictions. Every function can run again with the same result (nothing is redone).

Figures are rendered to PNG and shown with IPython.display, so they appear under Colab, Jupyter and
nbclient alike, whatever matplotlib backend is active.
"""
from __future__ import annotations

import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.files import replace_atomic
from runner.data import sources
from runner.data.scan import IMAGE_EXTENSIONS, is_ignored
from runner.errors import RunnerError
from runner.ui.progress import clock
from runner.run.records import TestReport
from runner.run.rundir import RunDir



def display_figure(figure: Figure) -> None:
    """Show a matplotlib figure inline as a PNG."""
    from IPython.display import Image, display
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    display(Image(data=buffer.getvalue()))


def describe_environment() -> list[str]:
    """Python and TensorFlow versions and the accelerator, with a warning line when it is not a GPU."""
    import tensorflow as tf
    lines = [f"Python {platform.python_version()}, TensorFlow {tf.__version__}"]
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        return lines + [f"accelerator: GPU ({', '.join(names)})"]
    if Path("/dev/accel0").exists() or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME"):
        return lines + ["accelerator: TPU", "WARNING: this runner does not use TPUs: TensorFlow will extract and "
                        "train on the host CPU. Use Runtime → Change runtime type → a GPU (e.g. T4)."]
    return lines + [f"accelerator: none (CPU only, {os.cpu_count()} cores)",
                    "WARNING: no GPU: extraction runs on the CPU and is many times slower. On Colab: Runtime → "
                    "Change runtime type → a GPU (e.g. T4), then Run all."]


def fetch_dataset(url: str, target: Path) -> Path:
    """Make sure `target` holds the dataset: download `url` (an archive; a cut download resumes) and unpack it
    with runner.data.sources' checks into a temporary folder beside `target`, then rename it into place, so an
    interrupted download or unpack never looks complete."""
    target = Path(target)
    if target.is_dir():
        return target
    if not url:
        raise RunnerError(f"DATA_DIR {target} does not exist: upload your photos there (one sub-folder per "
                          f"class) or set DATASET_URL to a .tgz archive of such folders.")
    target.parent.mkdir(parents=True, exist_ok=True)
    downloads = target.parent / f".{target.name}-partial-download"  # kept while a cut download resumes
    archive = sources.fetch(url, downloads / (Path(url.split("?")[0]).name or "archive"), "auto")
    prefix = f".{target.name}-download-"
    for stale in target.parent.glob(prefix + "*"):  # left by an unpack that was interrupted
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    try:
        sources.unpack_archive(archive, staging, url, "auto")
        replace_atomic(sources.dataset_root(staging), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(downloads, ignore_errors=True)  # unpacked, or damaged: downloaded again next time
    print(f"downloaded {url} into {target}")
    return target


def class_images(data_dir: Path, layout: str = "auto") -> dict[str, list[Path]]:
    """Class folder name → its image files, sorted; in a pre-split tree (data.layout, runner/data/layout.py)
    a class's images of every split."""
    from runner.data.layout import find_split_folders
    data_dir = Path(data_dir)
    try:
        roots = [data_dir / folder for folder in find_split_folders(data_dir, layout).values()] or [data_dir]
    except RunnerError:  # a top level the run would refuse: show its folders as they are
        roots = [data_dir]
    classes: dict[str, list[Path]] = {}
    for root in roots:
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and not is_ignored(folder.name):
                classes.setdefault(folder.name, []).extend(
                    p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not is_ignored(p.name))
    return {name: sorted(files) for name, files in sorted(classes.items())}


def _thumbnail(path: Path, size: int = 160) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return np.asarray(image)
    except (OSError, UnidentifiedImageError):
        return None


def _image_grid(items: list[tuple[Path, str]], columns: int, title: str) -> Figure:
    rows = max(1, -(-len(items) // columns))
    figure = Figure(figsize=(2.2 * columns, 2.5 * rows), layout="constrained")
    figure.suptitle(title)
    for i, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if i < len(items):
            path, caption = items[i]
            pixels = _thumbnail(path)
            if pixels is not None:
                axes.imshow(pixels)
            axes.set_title(caption, fontsize=8)
    return figure


def show_samples(data_dir: Path, per_class: int = 4, max_classes: int = 8) -> None:
    """Print the class sizes and show `per_class` images of the first `max_classes` classes."""
    classes = class_images(data_dir)
    print(f"{len(classes)} classes, {sum(map(len, classes.values()))} images:",
          ", ".join(f"{name} ({len(files)})" for name, files in classes.items()))
    shown = list(classes.items())[:max_classes]
    items = [(path, name) for name, files in shown for path in files[:per_class]]
    more = f" (first {max_classes} of {len(classes)} classes)" if len(classes) > max_classes else ""
    display_figure(_image_grid(items, per_class, f"sample images per class{more}"))


def run_status(run_dir: Path) -> list[str]:
    """The state of a run directory: its newest checkpoint and age, whether it finished and exported."""
    run = RunDir(run_dir)
    newest = run.latest()
    if newest is None:
        return [f"{run_dir}: no checkpoint yet (a new run, or one the trainer restores from sync first)"]
    marker = newest.marker
    val = marker.evaluation.val_accuracy if marker.evaluation else None
    lines = [f"newest checkpoint: step {newest.step} ({newest.stage} stage), saved "
             f"{clock(time.time() - (marker.saved_at or time.time()))} ago"
             + (f", validation accuracy {val:.3f}" if val is not None else "")]
    summary = run.read_summary()
    if summary is not None:
        accuracy = summary.test_accuracy
        lines.append(f"finished: step {summary.global_step}, test accuracy "
                     + ("n/a" if accuracy is None else f"{accuracy:.3f}"))
    export = run.export_info()
    lines.append(f"export: {', '.join(export.get('formats', []))} in {run.export}" if export is not None
                 else "export: not yet")
    return lines + sync_status(run)


def sync_status(run: RunDir) -> list[str]:
    """What the trainer's last sync left: the final snapshot on the remote, or where the model is and how to push."""
    from sync import recorded_outcome
    from sync.outcome import not_on_remote_message
    outcome = recorded_outcome(run.path)
    if outcome is None or not outcome.enabled:
        return []
    if outcome.final_on_remote:
        return [f"sync: the final snapshot (step {outcome.step}) is in {outcome.remote}"]
    if outcome.final:
        model_dir = run.export if run.export.is_dir() else None
        return [f"WARNING: {not_on_remote_message(outcome, run.path, run.config, model_dir)}"]
    return [outcome.message]


def per_class_table(report: TestReport, classes: list[str], limit: int = 50) -> list[str]:
    """Per-class test accuracy with the number of test images, worst classes first."""
    from runner.ui.report import confusion_entries  # the sparse cells (or an older run's dense matrix)
    entries = confusion_entries(report, len(classes))
    diagonal = entries[entries[:, 0] == entries[:, 1]]
    totals = np.bincount(entries[:, 0], weights=entries[:, 2], minlength=len(classes)).astype(np.int64)
    correct = np.bincount(diagonal[:, 0], weights=diagonal[:, 2], minlength=len(classes)).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda i: (correct[i] / totals[i] if totals[i] else 2.0, classes[i]))
    width = max([len(name) for name in classes] + [5])
    lines = [f"{'class':<{width}}  {'test images':>11}  {'correct':>7}  accuracy"]
    for i in order[:limit]:
        accuracy = f"{correct[i] / totals[i]:8.1%}" if totals[i] else "     n/a"
        lines.append(f"{classes[i]:<{width}}  {totals[i]:>11}  {correct[i]:>7}  {accuracy}")
    if len(classes) > limit:
        lines.append(f"... {len(classes) - limit} better classes not shown (all of them: test_report.json)")
    return lines


def show_results(run_dir: Path, data_dir: Path, max_misclassified: int = 12) -> None:
    """Summary, learning curves, confusion matrix (or top confusions), per-class table, misclassified images."""
    from IPython.display import Image, display
    run = RunDir(run_dir)
    summary, report, classes = run.read_summary(), run.read_test_report(), run.read_labels()
    accuracy = summary.test_accuracy
    print(f"test accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'} on {summary.num_test} images "
          f"at step {summary.global_step} ({summary.stage} stage); {len(summary.skipped_images)} "
          f"images skipped")
    report_dir = run.report
    display(Image(filename=str(report_dir / "curves.png")))
    if (report_dir / "confusion.png").is_file():
        display(Image(filename=str(report_dir / "confusion.png")))
    else:
        print((report_dir / "top_confusions.txt").read_text(encoding="utf-8"))
    print("\n".join(per_class_table(report, classes)))
    wrong = sorted(report.misclassified, key=lambda m: -m["probability"])[:max_misclassified]
    if wrong:
        items = [(Path(data_dir) / m["path"], f"{m['true']} → {m['predicted']}\n({m['probability']:.0%})")
                 for m in wrong]
        display_figure(_image_grid(items, 4, f"most confident mistakes ({len(report.misclassified)} in all)"))


def show_predictions(export_dir: Path, files: list[Path], top_k: int = 3) -> list:
    """Classify image files with an export and show each image with its top-k labels."""
    from runner.export.classify import ExportedModel, classify_files
    model = ExportedModel(Path(export_dir))
    results = classify_files(model, [Path(f) for f in files], min(top_k, len(model.classes)))
    items = []
    for result in results:
        if result.error is not None:
            print(f"{result.path}: {result.error}")
            continue
        caption = "\n".join(f"{name} {p:.0%}" for name, p in result.predictions)
        print(f"{result.path}: " + ", ".join(f"{name} {p:.1%}" for name, p in result.predictions))
        items.append((Path(result.path), caption))
    if items:
        display_figure(_image_grid(items, min(4, len(items)), "predictions of the exported model"))
    return results
