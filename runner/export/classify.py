"""Classify image files with an exported model.

    python -m runner.classify MODEL IMAGE_OR_DIR... [--top-k 5] [--json]

MODEL is an export folder (RUN_DIR/export, or a run folder holding one) or a snapshot archive (.tar.gz)
that contains an export folder. A file that cannot be classified gets its own error; the others are
still classified. The exit status is non-zero only when nothing could be classified.
"""
from __future__ import annotations

import argparse
import logging
import json
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tensorflow as tf

from common.cli import run_command
from runner.data.scan import sniff_format
from runner.errors import NothingClassified, RunnerError
from runner.export.labels import read_labels
from runner.run.rundir import RunDir

log = logging.getLogger("runner")

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def _is_export(folder: Path) -> bool:
    return (folder / "saved_model.pb").is_file() and (folder / "labels.txt").is_file()


def _find_export(root: Path, source: str) -> Path:
    if _is_export(root):
        return root
    found = sorted((p.parent for p in root.rglob("saved_model.pb") if _is_export(p.parent)),
                   key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise RunnerError(f"{source} holds no exported model (a folder with saved_model.pb and labels.txt); "
                          f"export one first: python -m runner.export --run RUN_DIR.")
    return found[0]


def extract_archive(archive: Path, into: Path) -> Path:
    """Safely unpack a snapshot archive (no absolute paths, links out or devices) and return its export."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RunnerError(f"{archive} is not a readable .tar.gz snapshot ({e}); download it again.") from None
    return _find_export(into, str(archive))


def download_from_drive(folder: str, sync_settings: list[str], workdir: Path) -> Path:
    """The newest verified snapshot of a Drive folder, downloaded through sync into `workdir`."""
    from sync import SyncConfig, open_sync
    from sync.errors import NoSnapshots
    run_dir = workdir / "snapshot"
    config = SyncConfig.from_settings({"backend": "drive", "folder": folder}, sync_settings)
    sync = open_sync(config, run_dir, workdir / "cache", run_id="classify", start_uploader=False)
    try:
        step = sync.download_latest(run_dir)
    finally:
        sync.close(timeout=0)
    if step is None:
        raise NoSnapshots(f"Drive folder {folder!r} holds no snapshot; check sync.folder (the same value the "
                          f"training run used).")
    log.info("downloaded the snapshot of step %d from Drive folder %s", step, folder)
    return run_dir


def resolve_model(spec: str, workdir: Path, sync_settings: list[str] = ()) -> Path:
    """The export folder named by MODEL: a folder, a run folder, an archive unpacked into `workdir`, or
    `drive:FOLDER` (the newest snapshot, downloaded and verified through sync)."""
    if spec.startswith("drive:"):
        return _find_export(download_from_drive(spec.removeprefix("drive:"), sync_settings, workdir), spec)
    path = Path(spec)
    if path.is_dir():
        run_export = RunDir(path).export  # a run folder: its own export first
        return _find_export(run_export if _is_export(run_export) else path, str(path))
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        return extract_archive(path, workdir)
    raise RunnerError(f"MODEL {spec!r} is neither an export folder nor a .tar.gz snapshot; pass RUN_DIR/export "
                      f"(made by python -m runner.export) or a downloaded snapshot archive.")


class ExportedModel:
    """A loaded export: encoded image bytes → class probabilities."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.classes = read_labels(folder)
        try:
            self._serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
        except (OSError, ValueError, KeyError, tf.errors.OpError) as e:
            raise RunnerError(f"{folder} could not be loaded as a SavedModel ({type(e).__name__}: {e}); "
                              f"export it again with python -m runner.export.") from None
        outputs = self._serve.structured_outputs["probabilities"].shape[-1]
        if outputs is not None and outputs != len(self.classes):
            raise RunnerError(f"{folder / 'labels.txt'} names {len(self.classes)} classes but the model has "
                              f"{outputs} outputs, so names would be wrong; restore labels.txt (one class per "
                              f"line, in the model's order) or export again with python -m runner.export.")

    def probabilities(self, image_bytes: bytes) -> np.ndarray:
        """Class probabilities of one encoded image; raises ValueError if it cannot be decoded."""
        if sniff_format(image_bytes[:16]) is None:
            raise ValueError("not an image (the file does not start like a JPEG, PNG, GIF, BMP or WebP)")
        try:
            return self._serve(images=tf.constant([image_bytes]))["probabilities"].numpy()[0]
        except tf.errors.InvalidArgumentError:
            raise ValueError("corrupt or truncated image: TensorFlow could not decode it") from None


@dataclass
class Result:
    """The outcome for one file: its top classes, or why it could not be classified."""
    path: str
    predictions: list[tuple[str, float]] | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": [{"class": c, "probability": round(p, 6)}
                                                   for c, p in self.predictions]}


def list_inputs(paths: list[str]) -> list[Path]:
    """The files named on the command line, folders expanded (recursively, hidden files skipped)."""
    files = []
    for item in map(Path, paths):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            files.append(item)
    return files


def classify_files(model: ExportedModel, files: list[Path], top_k: int) -> list[Result]:
    """Classify each file on its own, so one bad file does not stop the others."""
    results = []
    for file in files:
        try:
            probabilities = model.probabilities(file.read_bytes())
        except (OSError, ValueError) as e:
            results.append(Result(str(file), error=str(e) if isinstance(e, ValueError) else
                                  f"cannot read the file ({e.strerror or e})"))
            continue
        order = np.argsort(-probabilities)[:top_k]
        results.append(Result(str(file), [(model.classes[i], float(probabilities[i])) for i in order]))
    return results


def format_text(results: list[Result]) -> tuple[str, str]:
    """(stdout text of the classified files, stderr text of the per-file errors)."""
    out, err = [], []
    for result in results:
        if result.error is not None:
            err.append(f"error: {result.path}: {result.error}")
            continue
        out.append(result.path)
        width = max(len(name) for name, _ in result.predictions)
        out += [f"  {name:<{width}}  {probability:7.2%}" for name, probability in result.predictions]
    return "".join(line + "\n" for line in out), "".join(line + "\n" for line in err)


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m runner.classify MODEL IMAGE_OR_DIR... [--top-k 5] [--json]."""
    parser = argparse.ArgumentParser(prog="python -m runner.classify", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="export folder, run folder, snapshot archive (.tar.gz), or drive:FOLDER")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--set", action="append", default=[], metavar="sync.KEY=VALUE", dest="sync_settings",
                        help="for drive:FOLDER: sync settings such as sync.credentials=FILE.json")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    return run_command(lambda: classify_command(args))


def classify_command(args: argparse.Namespace) -> int:
    """Load the model, classify every file, print the results; NothingClassified when no file could be."""
    with tempfile.TemporaryDirectory(prefix="classify-") as workdir:
        model = ExportedModel(resolve_model(args.model, Path(workdir), args.sync_settings))
        files = list_inputs(args.inputs)
        if not files:
            raise RunnerError(f"no files found in {', '.join(args.inputs)}; pass image files or folders.")
        results = classify_files(model, files, min(args.top_k, len(model.classes)))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1), flush=True)
    else:
        out, err = format_text(results)
        sys.stdout.write(out)
        sys.stderr.write(err)
    if not any(r.error is None for r in results):
        raise NothingClassified(f"none of the {len(results)} file(s) could be classified (each one's reason is "
                                f"above); pass JPEG, PNG, GIF, BMP or WebP images.")
    return 0
