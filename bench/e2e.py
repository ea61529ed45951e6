"""The whole job, as users live it: time to an exported model, side by side in one run on this machine.

    python bench/e2e.py [--json] [--epochs 20] [--quick]

Same photos, backbone, weights, split (runner.data.scan.split_of) and test images for every contender:
  ours           `python resume.py --config configs/clothing_local.toml` in a child process (fresh run.dir
                 and cache.dir): process start to the exported model; test accuracy from its summary.json
  keras_guide    the keras-io guide "Transfer learning & fine-tuning", its typical workflow: the frozen base
                 inside the model (called with training=False), the guide's augmentation (RandomFlip,
                 RandomRotation), GlobalAveragePooling (here the backbone's pooling="avg"), Dropout 0.2, a
                 Dense layer; image_dataset_from_directory-like input (decode_image + bilinear resize,
                 batch 32, prefetch, cache) on our split; `fit` --epochs epochs with RMSprop; evaluate on the
                 test images; model.save(.keras). In a child process: process start to the saved model
  per_image      retrain.py's way, extraction only: one backbone call per image (read, decode, resize,
                 forward), timed on the first 400 photos; seconds per image x all images
After a SIGKILL half-way through each one's main work, at an output marker (so the kill lands at the same
point whatever the machine's load): ours once its cache's complete shards hold half the images' vectors
(polled on disk; shards are cache.shard_size = 512 vectors, so 1,024 of 1,885 here), the guide when fit prints "Epoch E/N" with E = N // 2 + 1 (half its epochs done). Then the
seconds a restart needs to finish. Ours resumes (the cache shards and checkpoints written before the kill
are kept); the guide saves nothing before its final model.save (its typical workflow shows no
ModelCheckpoint), so its restart is a run from scratch. And what the kill cost: time to the kill + the
restart's time - the unbroken run's time.
The bound: `import tensorflow, keras` in a fresh process + extraction of every image at the CPU-sharing
bound 1 / (1/decode + 1/forward) (bench/extraction.py's measurements) + our head phase; ours as a
fraction of it, and the phase shares of our job read from its timestamped output lines.
With --json the last line is one JSON object. --quick: 2 generated classes x 10 images, 2 epochs, 10 head
steps, export off (it checks the pieces work; its figures mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHARED = REPO.parent / "shared"
CONFIG = REPO / "configs" / "clothing_local.toml"
GUIDE_BATCH = 32
PHASES = ("startup", "scan", "extraction", "head", "export", "finish")
# the first output line of each phase after startup (ours, train.progress = lines); "finish" = report, sync, exit
PHASE_STARTS = (("scan", ("image files in",)), ("extraction", ("extracting bottlenecks for", "vectors computed now")),
                ("head", ("vectors computed now",)), ("export", ("head search:", "training head: ")),
                ("finish", ("exported step",)))


# -- the split every contender uses ---------------------------------------------------------------------
def split_lists(data: Path, validation_percent: float, test_percent: float) -> tuple[list[str], dict]:
    """(classes, {split: (paths, labels)}) of data's class folders, split as the runner splits them."""
    from runner.data.scan import IMAGE_EXTENSIONS, split_of
    classes = sorted(d.name for d in data.iterdir() if d.is_dir() and not d.name.startswith("."))
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "validation": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        for path in sorted((data / name).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                paths, labels = splits[split_of(f"{name}/{path.name}", validation_percent, test_percent)]
                paths.append(str(path))
                labels.append(label)
    return classes, splits


# -- child processes, timed from their start, their output lines timestamped -----------------------------
def run_timed(command: list[str], kill_at: Callable[[str], bool] | None = None,
              kill_when: Callable[[], bool] | None = None) -> tuple[float, list[tuple[float, str]], int, bool]:
    """(seconds from start to exit, [(seconds since start, line)], return code, killed): SIGKILL as soon as
    the child prints a line for which kill_at(line) is true, or kill_when() (polled every 0.05 s) is."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    killed = threading.Event()

    def kill() -> None:
        if not killed.is_set():
            killed.set()
            process.send_signal(signal.SIGKILL)

    def watch() -> None:
        while process.poll() is None and not killed.is_set():
            if kill_when():
                kill()
            time.sleep(0.05)
    if kill_when is not None:
        threading.Thread(target=watch, daemon=True).start()
    for line in process.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        if kill_at is not None and kill_at(line):
            kill()
    process.wait()
    return time.perf_counter() - start, lines, process.returncode, killed.is_set()


def cached_vectors(cache_dir: Path) -> int:
    """Vectors in the complete shards of a cache folder (a shard counts once its .npy is in place)."""
    from runner.features.cache import KEY_BYTES
    return sum(npy.with_suffix(".keys").stat().st_size // KEY_BYTES for npy in cache_dir.glob("*/shard-*.npy"))


def ours_half_way(cache_dir: Path, images: int) -> Callable[[], bool]:
    """Our kill marker: complete cache shards holding at least half the images' vectors."""
    return lambda: 2 * cached_vectors(cache_dir) >= images


def guide_half_way(epochs: int) -> Callable[[str], bool]:
    """The guide's kill marker: fit's "Epoch E/N" line with E = N // 2 + 1 (half its epochs done)."""
    marker = f"Epoch {epochs // 2 + 1}/{epochs}"
    return lambda line: line.strip() == marker


def killed_run(command: list[str], who: str, kill_at: Callable[[str], bool] | None = None,
               kill_when: Callable[[], bool] | None = None) -> tuple[float, list[tuple[float, str]]]:
    """Run `command` until its kill marker and SIGKILL it there; (seconds to the kill, its lines)."""
    wall, lines, code, killed = run_timed(command, kill_at, kill_when)
    if not killed:
        raise SystemExit(f"{who} never reached its half-way marker (exit {code}); the kill figure would mean "
                         f"nothing:\n" + "\n".join(line for _, line in lines[-20:]))
    return wall, lines


def ours_command(args, run_dir: Path, cache_dir: Path) -> list[str]:
    """resume.py on the shared config, with this bench's data, weights and fresh directories."""
    settings = [f"data.dir={args.data}", f"backbone.weights={args.weights}", f"run.dir={run_dir}",
                f"cache.dir={cache_dir}", "train.progress=lines",
                f"split.validation_percent={args.validation_percent:g}", f"split.test_percent={args.test_percent:g}"]
    settings += args.ours_set
    return [sys.executable, str(REPO / "resume.py"), "--config", str(CONFIG)] + [
        part for setting in settings for part in ("--set", setting)]


def guide_command(args, out: Path) -> list[str]:
    return [sys.executable, __file__, "--child-guide", str(out), "--data", str(args.data), "--weights", args.weights,
            "--epochs", str(args.epochs), "--validation-percent", str(args.validation_percent),
            "--test-percent", str(args.test_percent)]


def phase_starts(lines: list[tuple[float, str]]) -> dict[str, float | None]:
    """Seconds from process start to each of our phases (PHASES) began; None for a phase not seen."""
    starts: dict[str, float | None] = {"startup": 0.0}
    for phase, markers in PHASE_STARTS:
        found = [at for at, line in lines if any(marker in line for marker in markers)]
        if phase == "export":
            found = found[-1:]  # the head phase ends at its last training line or the search's choice
        starts[phase] = min(found) if found else None
    return starts


def phase_reached(lines: list[tuple[float, str]]) -> str:
    """The last phase a (killed) run began."""
    starts = phase_starts(lines)
    return [p for p in PHASES if starts[p] is not None][-1]


def phase_seconds(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Seconds of each of our phases (PHASES), from the first output line of each; a phase whose start is
    missing (export off, nothing to extract) takes 0 s."""
    starts = phase_starts(lines)
    bounds, previous = {}, 0.0
    for phase in PHASES:
        bounds[phase] = previous = starts.get(phase) if starts.get(phase) is not None else previous
    ends = [bounds[p] for p in PHASES[1:]] + [wall]
    return {phase: max(0.0, end - bounds[phase]) for phase, end in zip(PHASES, ends)}


def ours(args, root: Path, images: int) -> dict:
    """Our default job from scratch; then, in fresh directories, killed half-way through extraction and restarted."""
    wall, lines, code, _ = run_timed(ours_command(args, root / "run", root / "cache"))
    if code != 0:
        raise SystemExit(f"resume.py failed ({code}):\n" + "\n".join(line for _, line in lines))
    summary = json.loads((root / "run" / "summary.json").read_text())
    killed_at, killed_lines = killed_run(ours_command(args, root / "run-k", root / "cache-k"), "ours",
                                         kill_when=ours_half_way(root / "cache-k", images))
    after, after_lines, code, _ = run_timed(ours_command(args, root / "run-k", root / "cache-k"))
    if code != 0:
        raise SystemExit(f"resume.py after the kill failed ({code}):\n" + "\n".join(line for _, line in after_lines))
    return {"s": wall, "test_acc": summary["test_accuracy"], "num_test": summary["num_test"],
            "phases": phase_seconds(lines, wall), "killed_at_s": killed_at,
            "killed_during": phase_reached(killed_lines), "after_kill_s": after,
            "after_kill_output": [line for _, line in after_lines if "vectors computed now" in line
                                  or "resumed from" in line]}


def keras_guide_run(args, root: Path) -> dict:
    """The guide's workflow in a child process; then killed after half its epochs and run again from scratch."""
    wall, lines, code, _ = run_timed(guide_command(args, root / "guide"))
    if code != 0:
        raise SystemExit(f"the Keras guide's workflow failed ({code}):\n" + "\n".join(line for _, line in lines))
    result = json.loads(lines[-1][1])
    killed_at, _ = killed_run(guide_command(args, root / "guide-k"), "the Keras guide", guide_half_way(args.epochs))
    saved = [p.name for p in (root / "guide-k").glob("*")] if (root / "guide-k").exists() else []
    after, lines, code, _ = run_timed(guide_command(args, root / "guide-k"))
    if code != 0:
        raise SystemExit(f"the guide's rerun failed ({code}):\n" + "\n".join(line for _, line in lines))
    return dict(result, s=wall, killed_at_s=killed_at, saved_before_kill=saved, after_kill_s=after)


# -- the Keras guide's workflow (run in the child) --------------------------------------------------------
def guide_dataset(paths: list[str], labels: list[int], size: int, shuffle: bool):
    """image_dataset_from_directory's input on given files: decode_image, bilinear resize, batch 32; the guide's
    .prefetch().cache()."""
    import numpy as np
    import tensorflow as tf
    order = np.random.default_rng(0).permutation(len(paths)) if shuffle else np.arange(len(paths))

    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.ensure_shape(tf.image.resize(image, (size, size)), (size, size, 3)), label
    dataset = tf.data.Dataset.from_tensor_slices(([paths[i] for i in order], np.array(labels, np.int32)[order]))
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(GUIDE_BATCH).prefetch(
        tf.data.AUTOTUNE).cache()


def keras_guide(data: Path, weights: str, epochs: int, out: Path, validation_percent: float,
                test_percent: float) -> dict:
    """Train, evaluate and save the guide's model; {test_acc, num_test, model}."""
    import keras
    from runner.features.backbones import build_backbone
    from runner.run.config import BackboneConfig
    classes, splits = split_lists(data, validation_percent, test_percent)
    backbone = build_backbone(BackboneConfig(name="mobilenet", weights=weights, alpha=0.25))
    size = backbone.image_size
    base = backbone.model  # MobileNet 0.25 with its preprocessing (the guide's Rescaling) and pooling="avg"
    base.trainable = False
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
    inputs = keras.Input((size, size, 3))
    x = base(augmentation(inputs), training=False)
    outputs = keras.layers.Dense(len(classes))(keras.layers.Dropout(0.2)(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.RMSprop(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    train, val, test = (guide_dataset(*splits[name], size, name == "train") for name in ("train", "validation", "test"))
    model.fit(train, epochs=epochs, validation_data=val if splits["validation"][0] else None, verbose=2)
    _, accuracy = model.evaluate(test, verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    return {"test_acc": float(accuracy), "num_test": len(splits["test"][0]), "model": str(out / "model.keras")}


# -- measured in this process: the per-image way and the bound --------------------------------------------
def tf_import_seconds() -> float:
    """Seconds of `import tensorflow, keras` in a fresh process."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tensorflow, keras"], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return time.perf_counter() - began


def extraction_rates(weights: str, paths: list[str], rate_images: int) -> dict:
    """retrain.py's per-image extraction (s/image x images) and our extraction's CPU-sharing bound, from
    bench/extraction.py's measurements on a sample of `rate_images` of `paths`."""
    from extraction import (PER_IMAGE_LIMIT, cpu_sharing_bound, decode_ours, per_image, plain_forward,
                            pure_forward, read_all, timed)
    from runner.features.backbones import build_backbone
    from runner.run.config import BackboneConfig
    backbone = build_backbone(BackboneConfig(name="mobilenet", weights=weights, alpha=0.25))
    forward, size = plain_forward(backbone), backbone.image_size
    sample = paths[:: max(1, len(paths) // rate_images)][:rate_images]
    read_all(paths)
    per_image(sample[:8], forward, size)  # warm-up: tracing, thread pools
    decode_ours(sample[:8], size)
    timed_per_image = sample[:PER_IMAGE_LIMIT]
    per_image_rate = timed(per_image, timed_per_image, forward, size)
    decode_rate = timed(decode_ours, sample, size)
    forward_rate = timed(pure_forward, forward, size, len(sample))
    bound_rate = cpu_sharing_bound(decode_rate, forward_rate)
    return {"per_image_s": len(paths) / per_image_rate, "per_image_timed_on": len(timed_per_image),
            "decode_img_s": decode_rate, "forward_img_s": forward_rate, "bound_img_s": bound_rate,
            "bound_extraction_s": len(paths) / bound_rate}


# -- the run ------------------------------------------------------------------------------------------------
def quick_setup(args, root: Path) -> None:
    """--quick: a generated 2-class dataset, 1 epoch, a few head steps, export off."""
    from tests.helpers import write_synthetic_dataset
    args.data = write_synthetic_dataset(root / "data", 2, 10)
    args.epochs, args.rate_images = 2, 8  # 2: Keras prints no "Epoch E/N" line (the kill marker) for one epoch
    args.validation_percent = args.test_percent = 25.0
    args.ours_set = ["train.steps=10", "export.enabled=false", "checkpoint.every_steps=5"] + args.ours_set


def measure(args, root: Path) -> dict:
    if args.quick:
        quick_setup(args, root)
    _, splits = split_lists(Path(args.data), args.validation_percent, args.test_percent)
    paths = [p for name in ("train", "validation", "test") for p in splits[name][0]]
    mine = ours(args, root / "ours", len(paths))
    guide = keras_guide_run(args, root / "keras")
    if mine["num_test"] != guide["num_test"]:
        raise SystemExit(f"the test splits differ: ours {mine['num_test']} images, the guide's {guide['num_test']}")
    rates = extraction_rates(args.weights, paths, args.rate_images)
    import_s = tf_import_seconds()
    bound_s = import_s + rates["bound_extraction_s"] + mine["phases"]["head"]
    return {"images": len(paths), "ours": mine, "keras_guide": guide, "import_s": import_s, "bound_s": bound_s,
            **rates}


def kill_cost(result: dict) -> float:
    """Seconds a SIGKILL added to the job: time to the kill + the restart's time to finish - the unbroken run."""
    return result["killed_at_s"] + result["after_kill_s"] - result["s"]


def report(r: dict, args) -> dict:
    mine, guide = r["ours"], r["keras_guide"]
    print(f"\nthe whole job to an exported model, {r['images']} images, {os.cpu_count()} CPUs, one run each "
          f"(the machine is shared: figures move with its load)")
    print(f"  ours (resume.py, default job)      {mine['s']:7.1f} s   test accuracy {100 * mine['test_acc']:.1f} % "
          f"({mine['num_test']} test images)")
    print(f"  Keras guide (fit {args.epochs} epochs)      {guide['s']:7.1f} s   test accuracy "
          f"{100 * guide['test_acc']:.1f} % (the same {guide['num_test']} test images)")
    print(f"  retrain.py way, extraction only    {r['per_image_s']:7.1f} s   (one call per image, timed on "
          f"{r['per_image_timed_on']})")
    print(f"  ours / Keras guide: {guide['s'] / mine['s']:.2f}x faster")
    print(f"\nafter a SIGKILL half-way (ours: half the vectors in the cache; the guide: half its epochs), the seconds "
          f"a restart needs to finish:")
    print(f"  ours        killed at {mine['killed_at_s']:.1f} s (during {mine['killed_during']}); resumed and finished "
          f"in {mine['after_kill_s']:.1f} s  [{'; '.join(s.split('runner: ')[-1] for s in mine['after_kill_output'])}]")
    print(f"  Keras guide killed at {guide['killed_at_s']:.1f} s; it had saved {guide['saved_before_kill'] or 'nothing'}; "
          f"rerun from scratch in {guide['after_kill_s']:.1f} s")
    print(f"  what the kill cost (time to the kill + the restart's time - the unbroken run's): ours "
          f"{kill_cost(mine):.1f} s, the Keras guide {kill_cost(guide):.1f} s")
    print(f"\nthe bound: import {r['import_s']:.1f} s + extraction at 1/(1/decode + 1/forward) = "
          f"1/(1/{r['decode_img_s']:.0f} + 1/{r['forward_img_s']:.0f}) = {r['bound_img_s']:.1f} img/s: "
          f"{r['bound_extraction_s']:.1f} s + our head phase {mine['phases']['head']:.1f} s = {r['bound_s']:.1f} s; "
          f"ours reaches {r['bound_s'] / mine['s']:.2f} of it")
    print("  our phases: " + ", ".join(f"{p} {s:.1f} s ({100 * s / mine['s']:.0f} %)" for p, s in mine["phases"].items()))
    return {"ours_s": round(mine["s"], 1), "ours_test_acc": round(mine["test_acc"], 4),
            "keras_guide_s": round(guide["s"], 1), "keras_guide_test_acc": round(guide["test_acc"], 4),
            "ours_after_kill_s": round(mine["after_kill_s"], 1), "keras_guide_after_kill_s": round(guide["after_kill_s"], 1),
            "ours_kill_cost_s": round(kill_cost(mine), 1), "keras_guide_kill_cost_s": round(kill_cost(guide), 1),
            "bound_s": round(r["bound_s"], 1), "ours_fraction_of_bound": round(r["bound_s"] / mine["s"], 3),
            "per_image_s": round(r["per_image_s"], 1), "import_s": round(r["import_s"], 2),
            "bound_img_s": round(r["bound_img_s"], 1), "images": r["images"], "num_test": mine["num_test"],
            "keras_guide_epochs": args.epochs, "keras_guide_after_kill": "rerun from scratch (nothing saved)",
            "ours_killed_during": mine["killed_during"], "cpus": os.cpu_count(),
            "ours_phases_s": {p: round(s, 1) for p, s in mine["phases"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "datasets" / "clothing-small"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"))
    parser.add_argument("--epochs", type=int, default=20, help="the guide's fit epochs")
    parser.add_argument("--validation-percent", type=float, default=10.0)
    parser.add_argument("--test-percent", type=float, default=10.0)
    parser.add_argument("--rate-images", type=int, default=400, help="photos the decode and forward rates are timed on")
    parser.add_argument("--set", dest="ours_set", action="append", default=[], help="an extra setting for ours")
    parser.add_argument("--quick", action="store_true", help="tiny generated data: checks the pieces, not the speed")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
    parser.add_argument("--child-guide", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_guide:
        print(json.dumps(keras_guide(Path(args.data), args.weights, args.epochs, Path(args.child_guide),
                                     args.validation_percent, args.test_percent)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        figures = report(measure(args, Path(tmp)), args)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
