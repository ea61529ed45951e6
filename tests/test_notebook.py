"""The Colab quickstart: valid nbformat with form fields, and "Run all" twice in a real IPython kernel (nbclient),
where `!python ...` runs in a pty and streams as on Colab; the second pass redoes nothing."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

from tests.helpers import MOBILENET_WEIGHTS, REPO, child_env, write_photo_archive

NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"
FORM_FIELDS = ("REPO_URL", "DATA_DIR", "DATASET_URL", "CONFIG", "RUN_DIR", "BACKBONE", "STEPS", "FINE_TUNE",
               "SYNC_BACKEND", "DRIVE_FOLDER", "EXTRA_SETTINGS")
PARAM = r"^(?P<name>[A-Z_]+) = (?P<value>.*?)  #@param(?P<spec>.*)$"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def form_fields(cell) -> dict[str, str]:
    return {m["name"]: m["value"] for m in re.finditer(PARAM, cell.source, re.M)}


def with_form_values(notebook: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """The notebook with its settings form filled in, as a user would type into the fields."""
    settings = notebook.cells[1]
    for name, value in values.items():
        settings.source, count = re.subn(rf"^{name} = .*?  #@param", lambda _: f"{name} = {value!r}  #@param",
                                         settings.source, flags=re.M)
        assert count == 1, f"form field {name} not found in the settings cell"
    return notebook


def test_notebook_is_valid_nbformat_without_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert len(code) >= 10 and all(not c.outputs and c.execution_count is None for c in code)


def test_settings_are_form_fields_with_the_repository_url_first_and_no_invented_url():
    notebook = read_notebook()
    settings = notebook.cells[1]
    fields = form_fields(settings)
    assert tuple(fields) == FORM_FIELDS
    assert fields["REPO_URL"] == '""', "REPO_URL must be left for the user to fill in, not point anywhere"
    assert "clone URL of your copy of this repository" in settings.source
    sources = "\n".join(c.source for c in notebook.cells)
    assert "github.com/bottleneck-runner" not in sources and "<this repository>" not in sources
    assert "subprocess" not in sources, "the trainer must run with !python so its output streams"
    assert re.search(r"^!python resume\.py \{TRAIN_ARGS\}", sources, re.M)


def test_every_cell_compiles_as_ipython_transforms_it_including_the_colab_only_branches():
    from IPython.core.inputtransformer2 import TransformerManager
    transform = TransformerManager().transform_cell
    for index, cell in enumerate(read_notebook().cells):
        if cell.cell_type == "code":
            python = transform(cell.source)
            compile(python, f"cell {index}", "exec")  # a SyntaxError names the cell
            assert "get_ipython().system(" in python or "!" not in cell.source.replace("!=", "")


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: (size, mtime in ns), to tell whether anything was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def cell_text(cell) -> str:
    """The text a cell showed: its streams, plus error names and values."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}")
    return "".join(parts)


def images_shown(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


def cell_with(notebook, text: str):
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and text in c.source]
    return cell


def run_all(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Runtime → Run all: every cell in order in a fresh IPython kernel started in the checkout."""
    from nbclient import NotebookClient
    executed = nbformat.from_dict(notebook)
    NotebookClient(executed, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPO)}}).execute()
    return executed


def stop_tensorboards(logdir_root: Path) -> None:
    """Stop the TensorBoard servers the notebook's %tensorboard cell started for this test."""
    from tensorboard import manager
    for info in manager.get_all():
        if str(logdir_root) in info.logdir:
            try:
                os.kill(info.pid, 15)
            except ProcessLookupError:
                pass


@pytest.fixture()
def photos_archive(tmp_path) -> Path:
    """A .tgz of three clothing classes (14 real photos each), as DATASET_URL would serve."""
    return write_photo_archive(tmp_path / "clothing.tgz", "clothing", 14)


@pytest.mark.slow
def test_run_all_twice_in_a_kernel_streams_progress_and_the_second_pass_redoes_nothing(
        shared_assets, photos_archive, tmp_path, monkeypatch):
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CI", raising=False)
    run_dir, drive, data_dir = tmp_path / "run", tmp_path / "drive", tmp_path / "photos"
    notebook = with_form_values(
        read_notebook(), DATA_DIR=str(data_dir), DATASET_URL=photos_archive.as_uri(), CONFIG="configs/clothing_local.toml",
        RUN_DIR=str(run_dir), BACKBONE="mobilenet", STEPS=40, SYNC_BACKEND="folder", DRIVE_FOLDER=str(drive),
        EXTRA_SETTINGS=f"backbone.weights={MOBILENET_WEIGHTS} eval.every_steps=20 checkpoint.every_steps=20 "
                       f"data.min_images_per_class=3")
    try:
        first = run_all(notebook)
        state = {name: tree_state(path) for name, path in
                 (("export", run_dir / "export"), ("drive", drive), ("cache", run_dir / "cache"),
                  ("tf1", Path(f"{run_dir}-tf1")), ("data", data_dir))}
        second = run_all(notebook)
    finally:
        stop_tensorboards(tmp_path)

    environment = cell_text(cell_with(first, "describe_environment"))
    assert re.search(r"Python 3\.\d+\.\d+, TensorFlow 2\.\d+", environment)
    assert "accelerator: none (CPU only" in environment and "WARNING: no GPU" in environment

    dataset = cell_with(first, "fetch_dataset")
    assert f"downloaded {photos_archive.as_uri()}" in cell_text(dataset)
    assert "3 classes, 42 images: hat (14), pants (14), shoes (14)" in cell_text(dataset)
    assert images_shown(dataset) == 1 and not list(tmp_path.glob(".photos-download-*"))

    status = cell_text(cell_with(first, "#@title Status"))
    assert "no checkpoint yet" in status and "no snapshots in folder" in status

    train = cell_text(cell_with(first, "!python resume.py"))
    assert re.search(r"extracting bottlenecks: 100%.*42/42", train), train  # tqdm bars: the pty is a terminal
    assert re.search(r"training head: 100%.*40/40", train), train
    assert "extraction and training run on the CPU" in train and "done: step 40" in train

    results = cell_with(first, "show_results")
    text = cell_text(results)
    assert "test accuracy" in text and re.search(r"class\s+test images\s+correct\s+accuracy", text)
    report = (run_dir / "test_report.json").read_text()
    assert images_shown(results) == 2 + ('"misclassified": []' not in report)  # curves, confusion, mistakes

    classify = cell_with(first, "show_predictions")
    assert images_shown(classify) == 1 and len(re.findall(r"(hat|pants|shoes) \d+\.\d%", cell_text(classify))) >= 9

    tf1 = cell_text(cell_with(first, "import_meta_graph"))
    assert "exported to" in tf1 and re.search(r"TF1 session says (hat|pants|shoes) \(\d+\.\d%\)", tf1), tf1
    assert "model.tflite (" in cell_text(cell_with(first, "small_files"))
    assert set(state["export"]) >= {"saved_model.pb", "model.tflite", "labels.txt"}
    assert "model.meta" not in state["export"] and "model.meta" in state["tf1"]
    assert state["drive"], "a snapshot should have reached the sync folder"

    # the second "Run all": the finished run says so, and downloads, extracts, exports and uploads nothing
    train = cell_text(cell_with(second, "!python resume.py"))
    assert "already finished, nothing changed: step 40" in train, train
    assert "extracting bottlenecks" not in train, train
    assert "downloaded" not in cell_text(cell_with(second, "fetch_dataset"))
    assert "newest checkpoint: step 40" in cell_text(cell_with(second, "#@title Status"))
    assert "exported to" not in cell_text(cell_with(second, "import_meta_graph"))
    for name, path in (("export", run_dir / "export"), ("drive", drive), ("cache", run_dir / "cache"),
                       ("tf1", Path(f"{run_dir}-tf1")), ("data", data_dir)):
        assert tree_state(path) == state[name], f"the second pass wrote into {name} ({path}); trainer said:\n{train}"


def test_an_interrupted_or_broken_dataset_download_is_never_taken_for_the_dataset(photos_archive, tmp_path):
    from runner.errors import DataError
    from runner.ui.notebook import fetch_dataset
    target = tmp_path / "photos"
    stale = tmp_path / ".photos-download-left-by-a-disconnect"
    (stale / "unpacked" / "hat").mkdir(parents=True)
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(photos_archive.read_bytes()[:2000])
    with pytest.raises(DataError, match="damaged or incomplete"):
        fetch_dataset(broken.as_uri(), target)
    assert not target.exists() and not list(tmp_path.glob(".photos-*"))
    assert fetch_dataset(photos_archive.as_uri(), target) == target
    assert sorted(p.name for p in target.iterdir()) == ["hat", "pants", "shoes"]
    photos_archive.unlink()  # a second call must not download again
    assert fetch_dataset(photos_archive.as_uri(), target) == target


def test_per_class_table_lists_test_counts_worst_class_first():
    from runner.run.records import TestReport
    from runner.ui.notebook import per_class_table
    report = TestReport(confusion_matrix=[[3, 1, 0], [0, 2, 0], [2, 0, 2]])
    lines = per_class_table(report, ["hat", "pants", "shoes"])
    assert [line.split()[:3] for line in lines[1:]] == [["shoes", "4", "2"], ["hat", "4", "3"], ["pants", "2", "2"]]
    assert lines[1].endswith("50.0%") and lines[3].endswith("100.0%")


@pytest.mark.slow
def test_the_colab_clone_cell_clones_once_then_pulls(tmp_path, monkeypatch):
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    notebook = read_notebook()
    checkout = tmp_path / "content" / "bottleneck-runner"
    (checkout.parent).mkdir()
    clone_cell = cell_with(notebook, "git clone")
    clone_cell.source = clone_cell.source.replace("/content/bottleneck-runner", str(checkout))
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO), str(origin)], check=True)
    settings = with_form_values(notebook, REPO_URL=origin.as_uri()).cells[1]
    pretend_colab = nbformat.v4.new_code_cell("IN_COLAB = True  # what `google.colab in sys.modules` says on Colab")
    notebook.cells = [settings, pretend_colab, clone_cell, nbformat.from_dict(clone_cell)]
    executed = run_all(notebook)
    first, second = (cell_text(cell) for cell in executed.cells[2:])
    assert f"working in {checkout}" in first and (checkout / "resume.py").is_file(), first
    assert "Already up to date." in second and f"working in {checkout}" in second, second
    assert not list(checkout.parent.glob("*.partial"))


def test_the_sample_images_cell_ignores_what_the_scan_ignores(tmp_path):
    from runner.ui.notebook import class_images
    for name in ("cats/a.jpg", "cats/._a.jpg", "cats/b.webp", "__MACOSX/cats/._a.jpg", ".hidden/c.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert class_images(tmp_path) == {"cats": [tmp_path / "cats" / "a.jpg", tmp_path / "cats" / "b.webp"]}
