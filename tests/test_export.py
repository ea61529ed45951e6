"""Export: the SavedModel, the frozen TF1 graph and TFLite all classify like the training-time head."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import cached_split

TOLERANCE = 2e-3  # cached vectors are float16; the exported graph computes them in float32


def copy_run(run_dir: Path, into: Path) -> Path:
    """A private copy of a run folder (checkpoints, config, reports) that a test may change."""
    return Path(shutil.copytree(run_dir, into / "run", ignore=shutil.ignore_patterns("tensorboard", "export")))


@pytest.fixture(scope="module")
def test_split(exported_run):
    """The test split: image bytes, labels, cached vectors, and the restored head's probabilities."""
    import tensorflow as tf
    from runner.run.config import load_config
    from runner.training.head import build_head
    run_dir, cache_dir, _ = exported_run
    config = load_config(run_dir / "config.toml")
    vectors, labels, records = cached_split(run_dir, cache_dir, "test")
    classes = json.loads((run_dir / "labels.json").read_text())
    head = build_head(len(classes), vectors.shape[1], config.head, config.train.seed)
    marker = json.loads(max((run_dir / "checkpoints").glob("ckpt-*.json"),
                            key=lambda p: int(p.stem.split("-")[1])).read_text())
    tf.train.Checkpoint(head=head).read(str(run_dir / "checkpoints" / f"ckpt-{marker['step']}")).expect_partial()
    reference = tf.nn.softmax(head(vectors, training=False)).numpy()
    images = [Path(r.path).read_bytes() for r in records]
    return images, labels, reference


@pytest.fixture(scope="module")
def saved_model_probabilities(exported_run, test_split):
    import tensorflow as tf
    _, _, export_dir = exported_run
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    outputs = serve(images=tf.constant(test_split[0]))
    return {key: value.numpy() for key, value in outputs.items()}


def tf1_session_run(export_dir: Path, images: list[bytes], via_meta_graph: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and top-k class names by tensor name, in a TF1 session, from model.meta or the GraphDef."""
    import tensorflow as tf
    names = json.loads((export_dir / "model.json").read_text())["tf1"]
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        if via_meta_graph:
            tf.compat.v1.train.import_meta_graph(str(export_dir / names["meta_graph"]))
        else:
            graph_def = tf.compat.v1.GraphDef()
            graph_def.ParseFromString((export_dir / names["frozen_graph"]).read_bytes())
            tf.compat.v1.import_graph_def(graph_def, name="")
        return tuple(session.run([names["probabilities"], names["classes"]], {names["input"]: images}))


def assert_matches_reference(probabilities: np.ndarray, reference: np.ndarray) -> None:
    assert probabilities.shape == reference.shape
    np.testing.assert_allclose(probabilities, reference, atol=TOLERANCE)
    margin = np.diff(np.sort(reference, axis=1)[:, -2:], axis=1)[:, 0]
    clear = margin > 2 * TOLERANCE
    assert clear.mean() > 0.95
    assert np.array_equal(probabilities.argmax(1)[clear], reference.argmax(1)[clear])


def test_export_folder_has_every_promised_file(exported_run):
    run_dir, _, export_dir = exported_run
    assert export_dir == run_dir / "export"
    for name in ("saved_model.pb", "labels.txt", "frozen_graph.pb", "model.meta", "model.tflite",
                 "model_quantized.tflite", "model.json", "variables/variables.meta", "variables/checkpoint"):
        assert (export_dir / name).stat().st_size > 0, name
    info = json.loads((export_dir / "model.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert info["classes"] == summary["classes"] == (export_dir / "labels.txt").read_text().splitlines()
    assert info["step"] == summary["global_step"]
    assert info["accuracy"] == {"test_accuracy": summary["test_accuracy"]}
    assert info["input_size"] == 224 and info["backbone"]["name"] == "mobilenet"
    assert info["runner_version"]
    assert set(info["tf1"]) >= {"meta_graph", "frozen_graph", "input", "probabilities", "classes"}
    assert info["meta_graph"]["meta_graph"] == "variables/variables.meta"
    assert info["meta_graph"]["checkpoint_dir"] == "variables"
    assert not list(run_dir.glob(".export-*")), "the staging folder was left behind"


def test_default_export_formats_are_a_saved_model_with_its_meta_graph_one_float_tflite_and_labels(exported_run,
                                                                                                 tmp_path):
    from runner.run.config import ExportConfig
    from runner.export.exporter import export_run
    run_dir = copy_run(exported_run[0], tmp_path)
    export_dir = export_run(run_dir, formats=ExportConfig().formats)
    info = json.loads((export_dir / "model.json").read_text())
    written = {p.name for p in export_dir.iterdir()} - {"assets", "fingerprint.pb"}  # SavedModel extras
    assert written == {"saved_model.pb", "variables", "model.tflite", "labels.txt", "model.json"}
    assert info["formats"] == ["saved_model", "meta_graph", "tflite", "labels"] and "tf1" not in info
    assert set(info["tflite"]) == {"float", "input", "output"}

    # the MetaGraph adds its graph and the checkpoint state file, and no copy of the weights
    meta_graph_files = {export_dir / info["meta_graph"]["meta_graph"], export_dir / "variables" / "checkpoint"}
    sizes = {p: p.stat().st_size for p in export_dir.rglob("*") if p.is_file()}
    with_meta_graph = sum(sizes.values())
    without = with_meta_graph - sum(sizes[p] for p in meta_graph_files)
    weights = sum(size for p, size in sizes.items() if p.name.startswith("variables.data"))
    print(f"default export: {with_meta_graph} bytes, {without} without the MetaGraph "
          f"(+{with_meta_graph / without - 1:.1%}); the weights alone are {weights} bytes")
    assert with_meta_graph < 1.05 * without
    assert sum(sizes[p] for p in meta_graph_files) < 0.25 * weights


def test_formats_asked_for_later_go_to_their_own_folder_and_leave_the_export_alone(exported_run, tmp_path):
    from runner.export.exporter import main
    run_dir = copy_run(exported_run[0], tmp_path)
    shutil.copytree(exported_run[2], run_dir / "export")
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "export").iterdir()}
    assert main(["--run", str(run_dir), "--formats", "tf1,labels", "--out", str(tmp_path / "tf1")]) == 0
    assert {p.name for p in (tmp_path / "tf1").iterdir()} == {"frozen_graph.pb", "model.meta", "labels.txt", "model.json"}
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "export").iterdir()} == before
    assert not list(tmp_path.glob(".tf1-*")), "the staging folder was left behind"


def test_an_unknown_export_format_is_refused_when_the_config_is_loaded():
    from runner.run.config import load_config
    from runner.errors import RunnerError
    with pytest.raises(RunnerError, match=r"export.formats = 'saved_model,onnx': unknown 'onnx'; use .*tf1"):
        load_config(None, ["data.dir=x", "export.formats=saved_model,onnx"])


def test_meta_graph_without_the_saved_model_it_restores_from_is_refused():
    from runner.run.config import load_config
    from runner.errors import RunnerError
    with pytest.raises(RunnerError, match=r"meta_graph restores its variables from the SavedModel.*add saved_model"):
        load_config(None, ["data.dir=x", "export.formats=meta_graph,tflite"])


def test_saved_model_signature_matches_the_training_head_on_the_test_split(test_split, saved_model_probabilities):
    images, labels, reference = test_split
    outputs = saved_model_probabilities
    assert_matches_reference(outputs["probabilities"], reference)
    top = outputs["top_k_indices"]
    assert top.shape == (len(images), 5)
    assert np.array_equal(top[:, 0], outputs["probabilities"].argmax(1))
    print(f"exported model test accuracy {np.mean(top[:, 0] == labels):.4f} on {len(labels)} images")


def test_the_saved_models_object_graph_holds_the_weights_flat_not_the_keras_objects(exported_run):
    import tensorflow as tf
    from runner.export.exporter import restore_run_model
    from runner.export.meta_graph import tf_variable
    run_dir, _, export_dir = exported_run
    loaded = tf.saved_model.load(str(export_dir))
    model = restore_run_model(run_dir)
    expected = sorted((tf_variable(v).name, tuple(v.shape)) for v in model.backbone.model.variables
                      + model.head.variables)
    assert sorted((v.name, tuple(v.shape)) for v in loaded.weights) == expected  # every weight once, nothing else
    assert not hasattr(loaded, "backbone") and not hasattr(loaded, "head")
    assert callable(loaded.serve) and callable(loaded.classify_pixels)


def test_top_k_classes_are_the_label_names_of_the_top_k_indices(exported_run, saved_model_probabilities):
    classes = (exported_run[2] / "labels.txt").read_text().splitlines()
    names = np.vectorize(lambda i: classes[i].encode())(saved_model_probabilities["top_k_indices"])
    assert np.array_equal(saved_model_probabilities["top_k_classes"], names)


@pytest.mark.parametrize("via_meta_graph", [True, False], ids=["meta_graph", "graph_def"])
def test_tf1_session_on_raw_jpeg_bytes_gives_the_same_predictions(exported_run, test_split,
                                                                  saved_model_probabilities, via_meta_graph):
    images, _, reference = test_split
    probabilities, classes = tf1_session_run(exported_run[2], images, via_meta_graph)
    assert_matches_reference(probabilities, reference)
    np.testing.assert_allclose(probabilities, saved_model_probabilities["probabilities"], atol=1e-5)
    assert np.array_equal(classes, saved_model_probabilities["top_k_classes"])


def seed_session_run(export_dir: Path, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The seed script's flow on an export: import the MetaGraph, restore the newest checkpoint of its folder,
    run the model.json tensors on JPEG bytes."""
    import tensorflow as tf
    names = json.loads((export_dir / "model.json").read_text())["meta_graph"]
    meta, checkpoint_dir = str(export_dir / names["meta_graph"]), str(export_dir / names["checkpoint_dir"])
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        saver = tf.compat.v1.train.import_meta_graph(meta)
        saver.restore(sess, tf.train.latest_checkpoint(checkpoint_dir))
        return tuple(sess.run([names["probabilities"], names["classes"]], {names["input"]: images}))


def unpacked_final_snapshot(run_dir: Path, into: Path) -> Path:
    """The export inside the run's final snapshot, packed as sync packs it and unpacked as classify unpacks it."""
    from runner.export.classify import extract_archive
    from runner.run.rundir import RunDir
    from sync.snapshot import pack
    run = RunDir(run_dir)
    files = run.hand_over(run.latest(), final=True)
    archive = into / "snapshot.tar.gz"
    pack(run_dir, list(files), {"step": run.latest().step}, archive)
    return extract_archive(archive, into / "unpacked")


@pytest.mark.parametrize("source", ["export", "snapshot"])
def test_the_seed_lines_on_the_default_meta_graph_give_the_saved_model_top1(exported_run, test_split,
                                                                           saved_model_probabilities, source,
                                                                           tmp_path):
    export_dir = exported_run[2] if source == "export" else unpacked_final_snapshot(exported_run[0], tmp_path)
    assert export_dir != exported_run[2] or source == "export"
    images, _, reference = test_split
    probabilities, classes = seed_session_run(export_dir, images)
    expected = saved_model_probabilities["probabilities"]
    assert np.array_equal(probabilities.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert np.array_equal(classes, saved_model_probabilities["top_k_classes"])
    assert_matches_reference(probabilities, reference)


def tflite_probabilities(model_path: Path, images: list[bytes], size: int) -> np.ndarray:
    """Run a TFLite model on decoded, resized images, one at a time as a mobile app would."""
    import tensorflow as tf
    from runner.features.backbones import decode_and_resize
    from runner.export.litert import tflite_interpreter
    interpreter = tflite_interpreter(model_path)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert list(source["shape"]) == [1, size, size, 3] and source["dtype"] == np.float32
    out = []
    for data in images:
        interpreter.set_tensor(source["index"], decode_and_resize(tf.constant(data), size).numpy()[None])
        interpreter.invoke()
        out.append(interpreter.get_tensor(target["index"])[0].copy())
    return np.array(out)


def test_tflite_loads_through_litert_where_it_imports_and_tf_lite_otherwise(exported_run, monkeypatch):
    import sys
    from runner.export.litert import tflite_interpreter
    model = exported_run[2] / "model.tflite"
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = None
    if Interpreter is not None:
        assert isinstance(tflite_interpreter(model), Interpreter)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    import tensorflow as tf
    fallback = tflite_interpreter(model)
    assert isinstance(fallback, tf.lite.Interpreter) and fallback.get_input_details()[0]["shape"][1] == 224


def test_tflite_top1_agrees_with_the_saved_model_on_real_test_images(exported_run, test_split,
                                                                     saved_model_probabilities):
    images = test_split[0]
    expected = saved_model_probabilities["probabilities"].argmax(1)
    float_agreement = np.mean(tflite_probabilities(exported_run[2] / "model.tflite", images, 224).argmax(1)
                              == expected)
    quantized_agreement = np.mean(tflite_probabilities(exported_run[2] / "model_quantized.tflite", images, 224)
                                  .argmax(1) == expected)
    print(f"TFLite top-1 agreement with the SavedModel on {len(images)} test images: float "
          f"{float_agreement:.2%}, dynamic-range quantized {quantized_agreement:.2%}")
    assert float_agreement >= 0.98
    assert quantized_agreement >= 0.8


def test_export_refuses_below_min_accuracy_and_writes_nothing(exported_run, tmp_path, capsys):
    from runner.errors import RunnerError
    from runner.export.exporter import export_run, main
    run_dir = copy_run(exported_run[0], tmp_path)
    config = (run_dir / "config.toml").read_text()
    assert "min_accuracy = 0.0" in config
    (run_dir / "config.toml").write_text(config.replace("min_accuracy = 0.0", "min_accuracy = 0.99"))
    with pytest.raises(RunnerError, match=r"test accuracy 0\.\d+ is below export.min_accuracy = 0.99"):
        export_run(run_dir)
    assert main(["--run", str(run_dir)]) == 2
    assert "lower export.min_accuracy" in capsys.readouterr().err
    assert not (run_dir / "export").exists() and not list(run_dir.glob(".export-*"))


def test_export_of_a_missing_step_names_the_available_ones(exported_run):
    from runner.errors import RunnerError
    from runner.export.exporter import export_run
    from runner.run.rundir import RunDir
    steps = ", ".join(str(c.step) for c in reversed(RunDir(exported_run[0]).checkpoints()))
    assert steps.count(",") == 2, "three checkpoints are kept"
    with pytest.raises(RunnerError, match=rf"--step 1234: .* available steps: {steps}\."):
        export_run(exported_run[0], step=1234)


def test_an_older_step_reports_its_validation_accuracy(exported_run):
    from runner.export.exporter import load_run_state, run_accuracy
    run_dir = exported_run[0]
    from runner.run.rundir import RunDir
    _, checkpoint = load_run_state(run_dir, RunDir(run_dir).checkpoints()[1].step)
    assert run_accuracy(run_dir, checkpoint) == ("val_accuracy", checkpoint.marker.evaluation.val_accuracy)


def test_a_failed_export_keeps_the_previous_export_and_leaves_no_staging_folder(exported_run, tmp_path,
                                                                                 monkeypatch):
    from runner.export import exporter as export
    run_dir = copy_run(exported_run[0], tmp_path)
    shutil.copytree(exported_run[2], run_dir / "export")
    before = (run_dir / "export" / "model.json").read_text()

    def crash(*args):
        raise RuntimeError("simulated crash while freezing the graph")
    monkeypatch.setattr(export, "write_tf1_graphs", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.export_run(run_dir)
    assert (run_dir / "export" / "model.json").read_text() == before
    assert not list(run_dir.glob(".export-*"))


def test_a_fine_tuned_run_exports_its_fine_tuned_backbone(exported_run, tmp_path):
    from runner.export.exporter import export_run
    from tests.helpers import checkpoint_values, local_mobilenet_args, run_resume
    run_dir = tmp_path / "finetuned"
    result = run_resume(*local_mobilenet_args(run_dir, exported_run[1], "train.steps=200", "fine_tune.enabled=true",
                                              "fine_tune.steps=6", "fine_tune.batch_size=8",
                                              "checkpoint.every_steps=100"))
    assert result.returncode == 0, result.stdout
    info = json.loads((export_run(run_dir) / "model.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert info["step"] == summary["global_step"] == 206 and info["stage"] == "finetune"
    assert info["accuracy"] == {"test_accuracy": summary["test_accuracy"]}

    # Keras 3 checkpoints store a variable once, under its shortest path: the fine-tuned backbone weights
    # appear as optimizer/_trainable_variables/N, so compare by value rather than by name
    trained = checkpoint_values(str(run_dir / "finetune" / "checkpoints" / "ckpt-6"))
    tuned = [value for name, value in trained.items()
             if name.startswith(("optimizer/_trainable_variables/", "head/")) and "OPTIMIZER_SLOT" not in name]
    exported = saved_model_arrays(run_dir / "export")
    head_only = saved_model_arrays(exported_run[2])
    assert len(tuned) > 2, "the checkpoint should hold fine-tuned backbone weights besides the head"
    assert all(contains(exported, value) for value in tuned), "the export lacks a fine-tuned weight"
    assert sum(not contains(head_only, value) for value in tuned) > 2, "the backbone weights did not change"


def saved_model_arrays(export_dir: Path) -> list[np.ndarray]:
    """Every numeric variable value stored in a SavedModel."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(export_dir / "variables" / "variables"))
    values = (reader.get_tensor(name) for name in reader.get_variable_to_shape_map())
    return [value for value in values if isinstance(value, np.ndarray) and value.dtype.kind == "f"]


def contains(arrays: list[np.ndarray], value: np.ndarray) -> bool:
    return any(a.shape == value.shape and np.array_equal(a, value) for a in arrays)


def docs_tflite_snippets() -> list[str]:
    """The ```python blocks of docs/export.md's TFLite section, in order."""
    import re
    from tests.helpers import REPO
    text = (REPO / "docs" / "export.md").read_text()
    section = text[text.index("## TFLite\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_documented_tflite_snippet_gives_the_probabilities_of_a_training_like_resize(exported_run):
    from tests.helpers import CLOTHING
    _, _, export_dir = exported_run
    photo = sorted((CLOTHING / "hat").glob("*.jpg"))[0]
    code = docs_tflite_snippets()[0].replace("RUN_DIR/export", str(export_dir)).replace("photo.jpg", str(photo))
    namespace: dict = {}
    exec(code, namespace)
    expected = tflite_probabilities(export_dir / "model.tflite", [photo.read_bytes()], 224)[0]
    np.testing.assert_allclose(namespace["probabilities"], expected, atol=1e-6)
    assert "Image.BILINEAR" not in code and "antialias=True" not in code


@pytest.mark.parametrize("shape", [(480, 640), (100, 37), (224, 224)], ids=["down", "up-and-down", "same"])
def test_the_documented_numpy_resize_matches_tf_image_resize(shape):
    import tensorflow as tf
    code = docs_tflite_snippets()[1]
    definitions = code[:code.index("\nimage = ")]
    namespace: dict = {}
    exec(definitions, namespace)
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3)).astype(np.uint8)
    expected = tf.image.resize(pixels, (224, 224), method="bilinear").numpy()
    np.testing.assert_allclose(namespace["resize_like_training"](pixels, 224), expected, atol=0.05)  # float32 rounding
    if shape == (480, 640):  # what the docs used to do: PIL's bilinear antialiases when it shrinks
        from PIL import Image
        antialiased = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.BILINEAR), np.float32)
        assert np.abs(antialiased - expected).max() > 20
