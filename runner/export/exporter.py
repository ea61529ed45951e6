"""Export a run's checkpoint in the formats of export.formats (SavedModel with a TF1 MetaGraph restored from its
variables, TFLite float by default; frozen TF1 graph and quantized TFLite on request), with labels.txt and model.json.

    python -m runner.export --run RUN_DIR [--step N] [--formats saved_model,meta_graph,tflite,labels] [--out FOLDER]

Everything is written to a temporary folder beside RUN_DIR/export (or --out) and renamed into place at the end,
so a crash never leaves half an export behind.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from runner import __version__
from runner.features.backbones import DECODED_FORMATS, Backbone, build_backbone, cache_identity
from common.cli import configure_logging, run_command
from common.files import replace_atomic
from runner.run.config import EXPORT_FORMATS, Config, load_config
from runner.errors import RunnerError
from runner.training.head import Head, build_head
from runner.export.meta_graph import serving_tensor_names, tf_variable, write_meta_graph
from runner.export.tflite import TFLITE_VARIANTS, convert, converted_backbone, pixels_spec
from runner.export.tflite_head import append_head
from runner.export.labels import write_labels
from runner.run.rundir import EXPORT_MODEL_INFO, CheckpointRef, RunDir

log = logging.getLogger("runner")

# the export serves (nothing trains from it), so the gradients of the backbone's tf.custom_gradient functions are
# not traced into it (most of tf.saved_model.save's time otherwise; docs/benchmarks.md)
SERVING_ONLY = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
FROZEN_GRAPH = "frozen_graph.pb"
META_GRAPH = "model.meta"


@dataclass
class RunModel:
    """A run's backbone and head with the weights of one checkpoint."""
    config: Config
    classes: list[str]
    checkpoint: CheckpointRef
    backbone: Backbone
    head: Head


def load_run_state(run_dir: Path, step: int | None = None) -> tuple[Config, CheckpointRef]:
    """A run's config and the checkpoint of run-wide step `step` (the newest by default)."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise RunnerError(f"{run.config} does not exist: --run must be a run directory made by resume.py.")
    return load_config(run.config), run.checkpoint_at(step)


def restore_run_model(run_dir: Path, step: int | None = None) -> RunModel:
    """Rebuild the backbone and head of a run and load one checkpoint (the newest by default)."""
    config, checkpoint = load_run_state(run_dir, step)
    classes = list(checkpoint.marker.classes)
    backbone = build_backbone(config.backbone)
    head = build_head(len(classes), backbone.feature_dim, config.head, config.train.seed)
    prefix = str(checkpoint.prefix)
    parts = {"head": head}
    if checkpoint.stage == "finetune":  # a fine-tuned checkpoint carries its own backbone weights
        parts["backbone"] = backbone.model
    try:
        tf.train.Checkpoint(**parts).read(prefix).assert_existing_objects_matched().expect_partial()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        raise RunnerError(f"checkpoint {prefix} could not be loaded into a {config.backbone.name} model with "
                          f"{len(classes)} classes ({type(e).__name__}: {str(e)[:300]}); is {RunDir(run_dir).config} "
                          f"the config this run was trained with?") from None
    return RunModel(config, classes, checkpoint, backbone, head)


def run_accuracy(run_dir: Path, checkpoint: CheckpointRef) -> tuple[str, float | None]:
    """The accuracy to report for a checkpoint: test accuracy if the test report is of this step, else
    the checkpoint's validation accuracy."""
    run = RunDir(run_dir)
    summary, report = run.read_summary(), run.read_test_report()
    if summary and report and summary.global_step == checkpoint.step and report.accuracy is not None:
        return "test_accuracy", float(report.accuracy)
    evaluation = checkpoint.marker.evaluation
    return "val_accuracy", evaluation.val_accuracy if evaluation else None


def check_accuracy_gate(run_dir: Path, step: int, kind: str, accuracy: float | None, minimum: float) -> None:
    """Refuse to export when the accuracy is below export.min_accuracy (or unknown while a minimum is set)."""
    if minimum <= 0:
        return
    if accuracy is None:
        raise RunnerError(f"export.min_accuracy = {minimum} but {run_dir} has no accuracy for step {step} "
                          f"(no test report of that step, no validation metrics); finish training first "
                          f"or set export.min_accuracy = 0 in {RunDir(run_dir).config}.")
    if accuracy < minimum:
        raise RunnerError(f"refusing to export step {step} of {run_dir}: {kind.replace('_', ' ')} "
                          f"{accuracy:.4f} is below export.min_accuracy = {minimum}. Train longer or on more "
                          f"data, or lower export.min_accuracy in {RunDir(run_dir).config}.")


@dataclass(frozen=True)
class _Networks:
    """The Keras backbone and head, kept out of the SavedModel's object graph (a plain object is not tracked)."""
    backbone: tf.keras.Model
    head: Head


class Classifier(tf.Module):
    """The exported model: encoded image bytes or decoded pixels → class probabilities and top-k names.

    Its weights are saved as one flat list (`weights`), not through the Keras objects: walking the Keras
    models' trackable children was about half of tf.saved_model.save (MobileNet 0.25: 1.9 s → 1.0 s)."""

    def __init__(self, model: RunModel):
        super().__init__(name="classifier")
        self._networks = _Networks(model.backbone.model, model.head)
        self.weights = [tf_variable(v) for v in model.backbone.model.variables + model.head.variables]
        self.size = model.backbone.image_size
        self._decode = model.backbone.decode
        self.top_k = min(model.config.export.top_k, len(model.classes))
        self.class_names = tf.constant(model.classes)
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        self.classify_pixels = tf.function(self._classify_pixels, input_signature=[
            tf.TensorSpec([None, self.size, self.size, 3], tf.float32, name="pixels")])

    def _probabilities(self, pixels):
        networks = self._networks
        return tf.nn.softmax(networks.head(networks.backbone(pixels, training=False), training=False))

    def _classify_pixels(self, pixels):
        return {"probabilities": tf.identity(self._probabilities(pixels), name="probabilities")}

    def _serve(self, images):
        pixels = tf.map_fn(self._decode, images,
                           fn_output_signature=tf.TensorSpec([self.size, self.size, 3], tf.float32))
        probabilities = tf.identity(self._probabilities(pixels), name="probabilities")
        top = tf.math.top_k(probabilities, k=self.top_k)
        indices = tf.identity(top.indices, name="top_k_indices")
        return {"probabilities": probabilities, "top_k_indices": indices,
                "top_k_classes": tf.gather(self.class_names, indices, name="top_k_classes")}


def write_tf1_graphs(classifier: Classifier, out: Path) -> dict:
    """Freeze the serving function into frozen_graph.pb and model.meta; return the tensor names."""
    function = classifier.serve.get_concrete_function()
    frozen = convert_variables_to_constants_v2(function)
    graph_def = frozen.graph.as_graph_def()
    for node in graph_def.node:  # no device pins: a graph exported on a GPU must load on a CPU-only machine
        node.device = ""
    (out / FROZEN_GRAPH).write_bytes(graph_def.SerializeToString())
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        tf.compat.v1.train.export_meta_graph(filename=str(out / META_GRAPH), graph=graph)
    names = serving_tensor_names(function, frozen, {node.name for node in graph_def.node})
    return {"meta_graph": META_GRAPH, "frozen_graph": FROZEN_GRAPH, **names}


def write_tflite(classifier: Classifier, model: RunModel, out: Path, formats: tuple[str, ...]) -> dict:
    """The TFLite variants asked for, input [1, S, S, 3] float32 0..255: the cached converted backbone with the
    head appended (a head-stage checkpoint), or the whole model converted (a fine-tuned one)."""
    fine_tuned = model.checkpoint.stage == "finetune"
    identity = cache_identity(model.config.backbone)
    written = {}
    for format_name, key, name, optimizations in TFLITE_VARIANTS:
        if format_name not in formats:
            continue
        if fine_tuned:
            data = convert(classifier.classify_pixels.get_concrete_function(pixels_spec(classifier.size)),
                           optimizations)
        else:
            data = append_head(converted_backbone(model.backbone, identity, key, optimizations,
                                                  model.config.cache_dir), model.head)
        (out / name).write_bytes(data)
        written[key] = name
    size = classifier.size
    return dict(written, input=f"float32 [1, {size}, {size}, 3], RGB pixel values 0..255 (resized, not "
                               f"normalized)", output="probabilities [1, num_classes]")


def _replace_dir(staging: Path, target: Path) -> None:
    """Rename a finished folder over `target`, keeping the old one until the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        replace_atomic(target, old)
    replace_atomic(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: Path, step: int | None = None, formats: str | None = None, out: Path | None = None) -> Path:
    """Write RUN_DIR/export (or `out`) from a checkpoint (the newest by default) in the run's export.formats
    (or `formats`, same syntax) and return its path."""
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else RunDir(run_dir).export
    config, checkpoint = load_run_state(run_dir, step)
    if formats is not None:
        config.export.formats = formats
    names = config.export.format_names()
    kind, accuracy = run_accuracy(run_dir, checkpoint)
    check_accuracy_gate(run_dir, checkpoint.step, kind, accuracy, config.export.min_accuracy)
    model = restore_run_model(run_dir, checkpoint.step)
    marker = model.checkpoint.marker
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
        classifier = Classifier(model)
        info = {
            "format": 1, "runner_version": __version__, "exported_at": time.time(),
            "backbone": marker.backbone.to_json(),
            "input_size": model.backbone.image_size, "classes": model.classes,
            "accuracy": {kind: accuracy}, "step": checkpoint.step, "stage": checkpoint.stage,
            "top_k": classifier.top_k, "formats": list(names),
        }
        if "saved_model" in names:
            tf.saved_model.save(classifier, str(staging), signatures={
                "serving_default": classifier.serve.get_concrete_function(),
                "classify_pixels": classifier.classify_pixels.get_concrete_function()}, options=SERVING_ONLY)
            info["saved_model"] = {"dir": ".", "signature": "serving_default", "input": "images: tf.string [None]",
                                   "image_formats": DECODED_FORMATS,
                                   "outputs": ["probabilities", "top_k_indices", "top_k_classes"]}
            if "meta_graph" in names:  # after the SavedModel: its graph restores from the SavedModel's variables/
                info["meta_graph"] = write_meta_graph(classifier.serve.get_concrete_function(), classifier, staging)
        if "labels" in names:
            info["labels"] = write_labels(staging, model.classes).name
        if "tf1" in names:
            info["tf1"] = write_tf1_graphs(classifier, staging)
        if {"tflite", "tflite_quantized"} & set(names):
            info["tflite"] = write_tflite(classifier, model, staging, names)
        (staging / EXPORT_MODEL_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported step %d of %s to %s (%s)", checkpoint.step, run_dir, target, ", ".join(names))
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m runner.export --run RUN_DIR [--step N]."""
    parser = argparse.ArgumentParser(prog="python -m runner.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="the run directory (run.dir)")
    parser.add_argument("--step", type=int, help="run-wide checkpoint step to export, as in metrics.jsonl (default: the newest)")
    parser.add_argument("--formats", help="comma-separated formats, as export.formats (default: the run's "
                                          "export.formats): " + ", ".join(EXPORT_FORMATS))
    parser.add_argument("--out", type=Path, help="folder to write (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    configure_logging()

    def command() -> int:
        print(f"exported to {export_run(args.run, args.step, args.formats, args.out)}", flush=True)
        return 0
    return run_command(command)
