"""Shared test helpers: run resume.py as a user would, read checkpoints, make small datasets."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLOTHING = SHARED / "datasets" / "clothing-small"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def resume_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "resume.py"), *args]


def child_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("CI", None)
    return env


def run_resume(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python resume.py ARGS` to completion and return its result (stdout+stderr in .stdout)."""
    return subprocess.run(resume_command(*args), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start_resume(*args: str) -> subprocess.Popen:
    """Start `python resume.py ARGS` in the background, output to a pipe."""
    return subprocess.Popen(resume_command(*args), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def local_mobilenet_args(run_dir: Path, cache_dir: Path | None = None, *extra: str,
                         data_dir: Path = CLOTHING, export: bool = False) -> list[str]:
    """resume.py arguments for the real-weights MobileNet config on `data_dir` (export off unless asked:
    it costs seconds per run and has tests of its own)."""
    args = ["--config", str(REPO / "configs" / "clothing_local.toml"), "--set", f"run.dir={run_dir}",
            "--set", f"data.dir={data_dir}", "--set", f"backbone.weights={MOBILENET_WEIGHTS}",
            "--set", "train.progress=lines", "--set", f"export.enabled={str(export).lower()}"]
    if cache_dir is not None:
        args += ["--set", f"cache.dir={cache_dir}"]
    for item in extra:
        args += ["--set", item]
    return args


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def checkpoint_values(prefix: str) -> dict[str, np.ndarray]:
    """Every variable stored in a checkpoint, by name."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE") and "save_counter" not in name}


def latest_checkpoint_prefix(run_dir: Path) -> str:
    markers = sorted((Path(run_dir) / "checkpoints").glob("ckpt-*.json"),
                     key=lambda p: int(p.stem.split("-")[1]))
    return str(markers[-1].with_suffix(""))


def write_synthetic_dataset(root: Path, num_classes: int, per_class: int, size: int = 64,
                            seed: int = 0) -> Path:
    """JPEG images whose colour and stripe pattern depend on the class (learnable, not trivial)."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for k in range(num_classes):
        folder = root / f"class_{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        hue = np.array([(k * 37) % 256, (k * 91) % 256, (k * 53) % 256], np.float32)
        period = 4 + k % 13
        stripes = (np.sin((xx * np.cos(k) + yy * np.sin(k)) * 2 * np.pi / period) > 0)[..., None]
        for i in range(per_class):
            noise = rng.normal(0, 20, (size, size, 3))
            image = np.clip(hue * (0.6 + 0.4 * stripes) + noise, 0, 255).astype(np.uint8)
            (folder / f"img_{i:03d}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    return root


def write_many_class_dataset(root: Path, textures: int = 12, per_class: int = 40, size: int = 128,
                             seed: int = 0) -> Path:
    """10 x `textures` classes from the real clothing photos: class (garment, texture) = a random photo of
    that garment pasted at a random place on that class's striped, coloured background. Learnable (the
    texture is easy, the garment is as hard as in clothing-small), not trivial."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    photo_side = size * 11 // 16
    resized = functools.cache(lambda path: Image.open(path).convert("RGB").resize((photo_side,) * 2))
    for garment in sorted(p for p in CLOTHING.iterdir() if p.is_dir()):
        photos = sorted(garment.glob("*.jpg"))
        for t in range(textures):
            folder = root / f"{garment.name}-{t:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            hue = np.array([(t * 67) % 256, (t * 151) % 256, (t * 29 + 80) % 256], np.float32)
            angle, period = t * 0.7, 6 + 3 * (t % 5)
            wave = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
            for i in range(per_class):
                phase = rng.uniform(0, 2 * np.pi)
                stripes = np.sin(wave + phase) > 0
                canvas = hue * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
                photo = resized(photos[rng.integers(len(photos))])  # a photo drawn again is not decoded again
                y, x = rng.integers(0, size - photo_side, 2)
                canvas[y:y + photo_side, x:x + photo_side] = np.asarray(photo)
                Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.jpg",
                                                                             quality=90)
    return root


def logistic_regression_reference(run_dir: Path, cache_dir: Path) -> tuple[float, float]:
    """(test accuracy, C) of a logistic regression on the run's own cached vectors and split: features
    standardized on train, C over 0.01 ... 1 chosen on the validation split. One BLAS thread: on 2 shared
    cores OpenBLAS's threads spin against each other and the other xdist worker (20x slower on 120 classes;
    the same iterations and scores)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    (train_x, train_y, _), (val_x, val_y, _), (test_x, test_y, _) = (
        cached_split(run_dir, cache_dir, split) for split in ("train", "validation", "test"))
    scaler = StandardScaler().fit(train_x)
    with threadpool_limits(limits=1, user_api="blas"):
        fits = [(LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(train_x), train_y), c)
                for c in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)]
    model, c = max(fits, key=lambda fit: fit[0].score(scaler.transform(val_x), val_y))
    return model.score(scaler.transform(test_x), test_y), c


class OutputWatcher:
    """Collects a background process's output lines in a thread so a test can wait for one."""

    def __init__(self, process: subprocess.Popen):
        import threading
        self.process, self.lines = process, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> bool:
        """True once a line containing `text` has appeared; False if the process ended or time ran out."""
        return self.wait_until(lambda line: text in line, timeout)

    def wait_until(self, matches, timeout: float = 120) -> bool:
        """True once a line for which matches(line) is true has appeared; False if the process ended or
        time ran out."""
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(matches(line) for line in list(self.lines)):
                return True
            if self.process.poll() is not None:
                self.thread.join(5)
                return any(matches(line) for line in self.lines)
            time.sleep(0.02)
        return False

    def output(self) -> str:
        self.thread.join(30)
        return "".join(self.lines)


def sigkill_after_checkpoints(args: list[str], stage: str, steps: list[int]) -> None:
    """For each step: start `resume.py ARGS` (resuming what the last one left) and SIGKILL it as soon as it
    logs a checkpoint of `stage` at that step or later (observed progress, so it holds at any machine speed)."""
    import re
    saved = re.compile(rf"checkpoint saved at {stage} step (\d+)$")
    for step in steps:
        process = start_resume(*args)
        watcher = OutputWatcher(process)
        assert watcher.wait_until(lambda line: (m := saved.search(line.strip())) and int(m.group(1)) >= step,
                                  timeout=300), watcher.output()
        assert process.poll() is None, f"the run ended before it could be killed after step {step}"
        process.kill()  # SIGKILL: no handler runs, no final checkpoint
        process.wait()
        watcher.output()


def random_steps(every: int, total: int, count: int, seed: int) -> list[int]:
    """`count` distinct checkpoint steps below `total`, in order, chosen at random by `seed`."""
    import random
    return sorted(random.Random(seed).sample(range(every, total, every), count))


def assert_same_checkpoint(expected_prefix: str, actual_prefix: str) -> None:
    """Every variable of two checkpoints is bit-identical."""
    expected, actual = checkpoint_values(expected_prefix), checkpoint_values(actual_prefix)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert np.array_equal(expected[name], actual[name]), f"{name} differs after kill/resume"


def cached_split(run_dir: Path, cache_dir: Path, split: str):
    """A run's split read back with the runner's own scan and cache: (vectors, labels, records)."""
    from runner.features.cache import BottleneckCache
    from runner.run.config import load_config
    from runner.data.scan import HashIndex, scan_dataset
    config = load_config(Path(run_dir) / "config.toml")
    data = config.data
    dataset = scan_dataset(Path(data.dir), config.split.validation_percent, config.split.test_percent,
                           HashIndex(Path(cache_dir) / "file-hashes.json"), 1, "lines", layout=data.layout,
                           labels=data.labels, labels_columns=data.labels_columns)
    identity = json.loads(next(Path(cache_dir).glob("*/identity.json")).read_text())
    dim = identity.pop("dim")
    records = dataset.split(split)
    vectors = BottleneckCache(Path(cache_dir), identity, dim).table([r.sha256 for r in records]).all()
    return vectors, np.array([r.label for r in records]), records


def sigterm_after_start(args: list[str], started_text: str, seconds: float = 0.0) -> tuple[int, str]:
    """Start `resume.py ARGS`, send SIGTERM `seconds` (default: at once) after `started_text` appears;
    (exit status, output)."""
    import signal
    import time
    process = start_resume(*args)
    watcher = OutputWatcher(process)
    assert watcher.wait_for(started_text), watcher.output()
    time.sleep(seconds)
    process.send_signal(signal.SIGTERM)
    code = process.wait(60)
    return code, watcher.output()


def write_photo_archive(archive: Path, top_folder: str, per_class: int) -> Path:
    """A .tgz of `top_folder`/{hat,pants,shoes}/ with `per_class` real clothing photos each (a dataset download)."""
    import shutil
    import tarfile
    import tempfile
    with tempfile.TemporaryDirectory() as staging:
        source = Path(staging) / top_folder
        for name in ("hat", "pants", "shoes"):
            (source / name).mkdir(parents=True)
            for src in sorted((CLOTHING / name).glob("*.jpg"))[:per_class]:
                shutil.copy(src, source / name / src.name)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(source, arcname=top_folder)
    return archive


def sigkill_once_shards(args: list[str], cache_dir: Path, shards: int) -> int:
    """Start `python resume.py ARGS`, SIGKILL it as soon as `shards` cache shards are on disk (a kill during
    extraction); how many shards there are after the kill."""
    import time
    process = start_resume(*args)
    watcher = OutputWatcher(process)
    deadline = time.monotonic() + 300
    while len(list(Path(cache_dir).glob("*/shard-*.npy"))) < shards and time.monotonic() < deadline:
        assert process.poll() is None, watcher.output()
        time.sleep(0.01)
    process.kill()
    process.wait()
    watcher.output()
    return len(list(Path(cache_dir).glob("*/shard-*.npy")))
