"""The TFLite export in process: the backbone converted once and reused, the head appended as TFLite ops."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers import MOBILENET_WEIGHTS


@pytest.fixture(scope="module")
def parts(shared_assets):
    """The real MobileNet 0.25 backbone, a head with a hidden layer and non-trivial standardization, and the
    classifier that the export builds from them."""
    from runner.features.backbones import build_backbone
    from runner.run.config import Config
    from runner.export.exporter import Classifier, RunModel
    from runner.training.head import build_head
    config = Config()
    config.backbone.name, config.backbone.alpha, config.backbone.weights = "mobilenet", 0.25, str(MOBILENET_WEIGHTS)
    config.head.hidden_units = 16
    backbone = build_backbone(config.backbone)
    head = build_head(5, backbone.feature_dim, config.head, 0)
    rng = np.random.default_rng(0)
    head.set_standardization(rng.normal(size=backbone.feature_dim), rng.uniform(0.5, 2.0, size=backbone.feature_dim))
    for weight in head.trainable_weights:
        weight.assign(0.1 * rng.normal(size=weight.shape).astype(np.float32))
    model = RunModel(config, [f"class{i}" for i in range(5)], SimpleNamespace(stage="head"), backbone, head)
    pixels = rng.uniform(0, 255, size=(3, backbone.image_size, backbone.image_size, 3)).astype(np.float32)
    return model, Classifier(model), pixels


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A cache folder the tests of this module share, so the backbone is converted once for them."""
    return tmp_path_factory.mktemp("tflite-cache")


def tflite_outputs(path, pixels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Probabilities of each image through the TFLite file, one at a time, and its signatures."""
    from runner.export.litert import tflite_interpreter
    interpreter = tflite_interpreter(path)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    out = []
    for image in pixels:
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        out.append(interpreter.get_tensor(target["index"])[0].copy())
    return np.array(out), interpreter.get_signature_list()


def test_the_head_appended_to_the_converted_backbone_classifies_like_the_saved_model(parts, shared_cache, tmp_path,
                                                                                      caplog):
    from runner.export.exporter import write_tflite
    model, classifier, pixels = parts
    shutil.rmtree(shared_cache / "tflite", ignore_errors=True)  # the backbone is converted now
    model.config.cache.dir = str(shared_cache)
    expected = classifier.classify_pixels(pixels)["probabilities"].numpy()
    with caplog.at_level(logging.INFO, logger="runner"):
        info = write_tflite(classifier, model, tmp_path, ("tflite",))
    assert info["float"] == "model.tflite" and not any("reusing" in r.message for r in caplog.records)
    probabilities, signatures = tflite_outputs(tmp_path / "model.tflite", pixels)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert signatures == {"serving_default": {"inputs": ["pixels"], "outputs": ["probabilities"]}}
    cached = list((shared_cache / "tflite").glob("*.tflite"))
    assert len(cached) == 1


def test_a_second_export_reuses_the_converted_backbone_and_a_fine_tuned_one_converts_its_own(
        parts, shared_cache, tmp_path, caplog, monkeypatch):
    import runner.export.tflite as tflite_export
    from runner.export.exporter import write_tflite
    model, classifier, pixels = parts
    model.config.cache.dir = str(shared_cache)
    (tmp_path / "first").mkdir()
    write_tflite(classifier, model, tmp_path / "first", ("tflite",))
    conversions = []
    real_convert = tflite_export.convert
    monkeypatch.setattr("runner.export.exporter.convert", lambda *a: conversions.append("whole") or real_convert(*a))
    monkeypatch.setattr(tflite_export, "convert", lambda *a: conversions.append("backbone") or real_convert(*a))
    (tmp_path / "second").mkdir()
    with caplog.at_level(logging.INFO, logger="runner"):
        write_tflite(classifier, model, tmp_path / "second", ("tflite",))
    assert conversions == [] and any("reusing the converted mobilenet backbone" in r.message for r in caplog.records)
    expected = classifier.classify_pixels(pixels)["probabilities"].numpy()
    np.testing.assert_allclose(tflite_outputs(tmp_path / "second" / "model.tflite", pixels)[0], expected, atol=1e-5)

    fine_tuned = type(model)(model.config, model.classes, SimpleNamespace(stage="finetune"), model.backbone, model.head)
    (tmp_path / "finetune").mkdir()
    write_tflite(classifier, fine_tuned, tmp_path / "finetune", ("tflite",))
    assert conversions == ["whole"]  # its backbone weights are its own: the cached backbone is not used
    np.testing.assert_allclose(tflite_outputs(tmp_path / "finetune" / "model.tflite", pixels)[0], expected, atol=1e-5)


def test_a_damaged_cached_backbone_is_converted_again(parts, shared_cache, tmp_path, caplog):
    from runner.export.exporter import write_tflite
    model, classifier, pixels = parts
    model.config.cache.dir = str(shared_cache)
    (tmp_path / "a").mkdir()
    write_tflite(classifier, model, tmp_path / "a", ("tflite",))
    (cached,) = (shared_cache / "tflite").glob("*.tflite")
    cached.write_bytes(cached.read_bytes()[:1000])  # e.g. a disk that lost the end of the file
    (tmp_path / "b").mkdir()
    with caplog.at_level(logging.WARNING, logger="runner"):
        write_tflite(classifier, model, tmp_path / "b", ("tflite",))
    assert any("is damaged" in r.message and cached.name in r.message for r in caplog.records)
    expected = classifier.classify_pixels(pixels)["probabilities"].numpy()
    np.testing.assert_allclose(tflite_outputs(tmp_path / "b" / "model.tflite", pixels)[0], expected, atol=1e-5)
    assert cached.stat().st_size > 100_000


def test_an_export_does_not_wait_for_ever_on_a_hung_background_converter(parts, tmp_path, caplog, monkeypatch):
    """A converter child that holds the conversion lock and never ends (hung): after LOCK_WAIT_S the export
    converts the backbone itself and its TFLite model is right."""
    import fcntl
    import threading
    import runner.export.tflite as tflite_export
    from runner.export.exporter import write_tflite
    model, classifier, pixels = parts
    model.config.cache.dir = str(tmp_path / "cache")
    monkeypatch.setattr(tflite_export, "LOCK_WAIT_S", 0.5)
    monkeypatch.setattr(tflite_export, "LOCK_POLL_S", 0.1)
    (tmp_path / "cache" / "tflite").mkdir(parents=True)
    hung = open(tmp_path / "cache" / "tflite" / tflite_export.LOCK_FILE, "a", encoding="utf-8")  # the hung child's
    fcntl.flock(hung, fcntl.LOCK_EX)
    (tmp_path / "export").mkdir()
    done = []
    try:
        with caplog.at_level(logging.INFO, logger="runner"):
            export = threading.Thread(target=lambda: done.append(write_tflite(classifier, model, tmp_path / "export",
                                                                              ("tflite",))), daemon=True)
            export.start()
            export.join(600)  # a guard against hanging the suite, not a timing: the wait itself is 0.5 s
    finally:
        hung.close()
    assert done, "the export still waits on the hung converter"
    assert any("converting the backbone here instead" in r.message for r in caplog.records)
    expected = classifier.classify_pixels(pixels)["probabilities"].numpy()
    np.testing.assert_allclose(tflite_outputs(tmp_path / "export" / "model.tflite", pixels)[0], expected, atol=1e-5)


def test_the_cache_key_changes_with_the_weights_and_the_variant():
    from runner.export.tflite import backbone_key
    identity = {"backbone": "mobilenet", "weights": "sha256:ab", "image_size": 224, "alpha": 0.25}
    assert backbone_key(identity, "float") == backbone_key(dict(identity), "float")
    assert backbone_key(identity, "float") != backbone_key(identity, "quantized")
    assert backbone_key(identity, "float") != backbone_key(dict(identity, weights="sha256:cd"), "float")


def test_the_shared_runs_small_backbone_was_converted_at_its_export_into_the_cache(clothing_run):
    run_dir, cache_dir, output = clothing_run
    assert "in the background" not in output  # MobileNet 0.25 (0.2M parameters): a child would cost more than it saves
    assert "TFLite: reusing the converted mobilenet backbone" not in output
    assert len(list((cache_dir / "tflite").glob("*.tflite"))) == 2  # float and quantized, for the next export
    assert len(list((cache_dir / "tflite").glob("*.sha256"))) == 2


def test_only_a_big_backbone_is_converted_in_the_background(parts):
    from runner.export.tflite import BACKGROUND_MIN_PARAMS, converts_in_background
    model, _, _ = parts
    assert not converts_in_background(model.backbone)
    big = SimpleNamespace(model=SimpleNamespace(count_params=lambda: BACKGROUND_MIN_PARAMS))
    assert converts_in_background(big)


def converter_processes(run_dir: Path) -> list[int]:
    """Pids of live background converters of `run_dir` (from /proc; zombies are not alive)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"runner.export.tflite" in command and str(run_dir).encode() in command and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_killed_run_leaves_no_converter_behind_and_a_stopped_one_stops_it(shared_assets, tmp_path):
    import subprocess
    import sys
    import time
    from tests.helpers import REPO, child_env
    run_dir = tmp_path / "run"
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from runner.run.config import load_config, to_toml
from runner.run.rundir import RunDir
from runner.export.tflite import start_background_conversion
config = load_config(None, ["data.dir=x", "run.dir={run_dir}", "backbone.name=inception_v3", "backbone.weights=none",
                            "backbone.allow_random_weights=true"])
RunDir(config.run_dir).path.mkdir(parents=True, exist_ok=True)
RunDir(config.run_dir).config.write_text(to_toml(config))
conversion = start_background_conversion(config)
print("started", conversion.process.pid, flush=True)
sys.stdin.readline()  # the test says when to close it
conversion.close()
print("closed", flush=True)
time.sleep(120)
"""
    for mode in ("kill", "close"):
        parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=child_env())
        line = parent.stdout.readline()
        assert line.startswith("started"), line
        child = int(line.split()[1])
        converter_log = run_dir / "cache" / "tflite" / "conversion.log"
        deadline = time.monotonic() + 120
        while "converting the inception_v3 backbone" not in converter_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)  # past its start-up checks: only the kernel's parent-death signal can stop it now
        assert converter_processes(run_dir) == [child]
        if mode == "kill":
            parent.kill()
        else:
            parent.stdin.write("close\n")
            parent.stdin.flush()
            assert parent.stdout.readline().strip() == "closed"
        deadline = time.monotonic() + 10  # Inception V3's conversion alone takes longer than this
        while converter_processes(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert converter_processes(run_dir) == [], mode
        parent.kill()
        parent.wait()
