"""The TFLite export: the backbone converted once per backbone and weights, the trained head appended as ops.

Converting a backbone is most of an export's time (Inception V3: about 11 s on a CPU), yet it
only depends on the backbone and its weights, never on the head. So the converted backbone (features out) is
kept in CACHE_DIR/tflite/, named by the backbone's cache identity, and each export appends its head to it:
runner/export/tflite_head.py appends the head's ops. A fine-tuned checkpoint carries its own backbone weights, so its whole model is converted as before.

The first conversion of a backbone happens off the export's path: once the run has built its backbone, a child
process (`python -m runner.export.tflite --run RUN_DIR`) converts it into the cache while extraction and the
head run, holding CACHE_DIR/tflite/.lock; an export that needs it waits on that lock and reuses the file.
The converter is mostly single-threaded, so beside extraction it costs less wall time than at the export.
A child pays a TensorFlow start-up and a backbone build of its own (about 3.5 CPU-seconds), so only backbones
of at least BACKGROUND_MIN_PARAMS parameters are converted in the background; smaller ones, whose conversion
costs less than that, convert at their first export (MobileNet 0.25: 0.3 s there), into the same cache.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from common.cli import exit_with
from common.files import write_bytes_atomic, write_text_atomic
from runner.features.backbones import Backbone, build_backbone, cache_identity
from runner.run.config import Config, load_config
from runner.run.rundir import RunDir

log = logging.getLogger("runner")

TFLITE_DIR = "tflite"  # inside the bottleneck cache folder
LOCK_FILE = ".lock"  # held while a backbone is converted into TFLITE_DIR
CHILD_LOG = "conversion.log"
# how long an export waits for the background converter before converting the backbone itself: several times
# the longest conversion measured (docs/benchmarks.md, "TFLite conversion"), for a machine busy with extraction
LOCK_WAIT_S = 600.0
LOCK_POLL_S = 1.0
# A background child pays its own start-up and backbone build; below this size that costs more than converting
# at the export does (the measurements: docs/benchmarks.md, "TFLite conversion").
BACKGROUND_MIN_PARAMS = 10_000_000
TFLITE_FLOAT = "model.tflite"
TFLITE_QUANTIZED = "model_quantized.tflite"
# (export format, model.json key, file, converter optimizations)
TFLITE_VARIANTS = (("tflite", "float", TFLITE_FLOAT, []),
                   ("tflite_quantized", "quantized", TFLITE_QUANTIZED, [tf.lite.Optimize.DEFAULT]))


def convert(function, optimizations: list) -> bytes:
    """TFLite bytes of a concrete function, frozen first (converting the live function loses the Keras 3
    variables: the model outputs NaN). The frozen function needs no variables, so the converter gets an empty
    module as its trackable: given the Keras model, it saved and reloaded the whole model as a SavedModel first,
    most of its time (MobileNet 0.25: 2.2 s → 0.3 s, Inception V3: 16 s → 11 s; the same bytes)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(function)],
                                                                tf.Module())
    converter.optimizations = optimizations
    return converter.convert()


def pixels_spec(size: int) -> tf.TensorSpec:
    """The TFLite input: one decoded, resized image, float32 0..255."""
    return tf.TensorSpec([1, size, size, 3], tf.float32, name="pixels")


def backbone_key(identity: dict, variant: str) -> str:
    """The cache file name of a converted backbone: its cache identity, the TFLite variant, TF's version."""
    text = json.dumps({"backbone": identity, "variant": variant, "tensorflow": tf.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_path(cache_dir: Path, identity: dict, variant: str) -> Path:
    """Where the converted backbone of `identity` in `variant` is kept."""
    return cache_dir / TFLITE_DIR / f"{backbone_key(identity, variant)}.tflite"


def _cached(path: Path) -> bytes | None:
    """A cached conversion whose sha256 still matches its sidecar, else None (a damaged one is reported)."""
    digest_path = path.with_suffix(".sha256")
    if not (path.is_file() and digest_path.is_file()):
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() == digest_path.read_text(encoding="utf-8").strip():
        return data
    log.warning("TFLite: %s is damaged (its sha256 differs from %s); converting the backbone again",
                path, digest_path.name)
    return None


@contextmanager
def conversion_lock(cache_dir: Path):
    """Hold CACHE_DIR/tflite/.lock, waiting (and saying so) while another process converts a backbone. A
    converter that holds it past LOCK_WAIT_S (hung) is not waited on longer: the block runs without the lock,
    so this process converts the backbone itself (the cache file is written atomically under a name fixed
    by its content, so a late converter writing it too does no harm)."""
    folder = cache_dir / TFLITE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a", encoding="utf-8") as lock:
        held = _try_lock(lock)
        if not held:
            log.info("TFLite: waiting for the backbone conversion running in the background (%s)",
                     folder / CHILD_LOG)
            held = _wait_for_lock(lock, LOCK_WAIT_S)
        if not held:
            log.warning("TFLite: the background conversion still holds %s after %.0f s; converting the backbone "
                        "here instead (the converter's log: %s)", folder / LOCK_FILE, LOCK_WAIT_S,
                        folder / CHILD_LOG)
        try:
            yield
        finally:
            if held:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _try_lock(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait_for_lock(lock, seconds: float) -> bool:
    """Whether the lock was taken within `seconds` (tried every LOCK_POLL_S)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(LOCK_POLL_S, max(0.0, deadline - time.monotonic())))
        if _try_lock(lock):
            return True
    return False


def converted_backbone(backbone: Backbone, identity: dict, variant: str, optimizations: list,
                       cache_dir: Path | None, locked: bool = True) -> bytes:
    """The backbone alone (pixels → features) as TFLite, from CACHE_DIR/tflite when an earlier export or the
    background conversion made it (and its sha256 still matches), else converted now and kept there."""
    if cache_dir is None:
        return _convert_backbone(backbone, optimizations)
    path = cached_path(cache_dir, identity, variant)
    with conversion_lock(cache_dir) if locked else nullcontext():
        data = _cached(path)
        if data is not None:
            log.info("TFLite: reusing the converted %s backbone (%s)", identity["backbone"], path)
            return data
        data = _convert_backbone(backbone, optimizations)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        write_text_atomic(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")  # last: it vouches
        return data


def _convert_backbone(backbone: Backbone, optimizations: list) -> bytes:
    features = tf.function(lambda pixels: backbone.model(pixels, training=False))
    return convert(features.get_concrete_function(pixels_spec(backbone.image_size)), optimizations)


def variants_to_convert(config: Config) -> list[tuple[str, str, str, list]]:
    """The TFLite variants the export of `config` will append a head to (none when the export is off or a
    fine-tuned backbone will be converted whole)."""
    if not config.export.enabled or config.fine_tune.enabled:
        return []
    names = config.export.format_names()
    return [variant for variant in TFLITE_VARIANTS if variant[0] in names]


def converts_in_background(backbone: Backbone) -> bool:
    """Whether `backbone` is big enough for its TFLite conversion to be worth a child process."""
    return backbone.model.count_params() >= BACKGROUND_MIN_PARAMS


class BackgroundConversion:
    """The child process converting a run's backbone into the cache; close() stops it if it still runs."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process, self.log_path = process, log_path

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        elif self.process.returncode != 0:  # the export converted the backbone itself
            log.warning("TFLite: the background conversion failed (exit %s); see %s", self.process.returncode,
                        self.log_path)
        self.process.wait()


def start_background_conversion(config: Config) -> BackgroundConversion | None:
    """Start converting the backbone's TFLite variants into the cache in a child process while the run goes on; None when nothing needs converting or another process is converting into this cache already."""
    variants = variants_to_convert(config)
    identity = cache_identity(config.backbone)
    cache_dir = config.cache_dir
    if not any(_cached(cached_path(cache_dir, identity, key)) is None for _, key, _, _ in variants):
        return None
    folder = cache_dir / TFLITE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lock = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        with open(folder / CHILD_LOG, "w", encoding="utf-8") as out:  # the child holds the lock until it exits
            process = subprocess.Popen(
                [sys.executable, "-m", "runner.export.tflite", "--run", str(config.run_dir), "--parent",
                 str(os.getpid())], pass_fds=(lock,), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env)
    finally:
        os.close(lock)
    log.info("TFLite: converting the %s backbone in the background (%s)", config.backbone.name, folder / CHILD_LOG)
    return BackgroundConversion(process, folder / CHILD_LOG)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed run leaves no converter behind)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    """The background conversion: convert RUN_DIR's backbone for its export into its cache folder."""
    parser = argparse.ArgumentParser(prog="python -m runner.export.tflite", description=main.__doc__)
    parser.add_argument("--run", required=True, type=Path, help="the run directory (its config.toml)")
    parser.add_argument("--parent", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.parent:
        _die_with_parent(args.parent)
    config = load_config(RunDir(args.run).config)
    log.info("converting the %s backbone for the export of %s", config.backbone.name, args.run)
    backbone = build_backbone(config.backbone)
    identity = cache_identity(config.backbone)
    for _, key, _, optimizations in variants_to_convert(config):
        converted_backbone(backbone, identity, key, optimizations, config.cache_dir, locked=False)  # lock inherited
    return 0


if __name__ == "__main__":
    exit_with(main())
