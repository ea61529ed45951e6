"""Extraction throughput against what a Keras user would write instead, on the same images in one run.

    python bench/extraction.py [--images N] [--large-images 300] [--json]

"small" = the shared clothing photos (about 400 x 534); "large" = the same photos re-encoded at
2,400 x 1,800 (or 1,800 x 2,400), generated into a temp dir. Images/s of:
  per_image    the retrain.py way: read, decode, resize, one forward call per image
  pipeline     our extraction (runner.features.extract.extract_missing into a fresh cache, shards written), in a
               child process configured as resume.py configures it (thread budget)
  forward      the pure forward pass on ready tensors (batch 32)
  decode       our decode + resize alone (the extraction's tf.data pipeline), DCT-ratio decoding for JPEGs
  decode_naive tf.io.decode_image + resize alone (what the runner did before), every core
  keras_peer   keras.utils.image_dataset_from_directory + model.predict with the same backbone and weights,
               in a child process with TensorFlow's default settings (the user's own program)
Every rate is the best of 2 runs after a warm-up (no timing includes tracing); per_image is timed on the
first 400 small photos. With --json the last line is one JSON object {"small": {...}, "large": {...}}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
BATCH = 32
LARGE_SIDES = (2400, 1800)


def backbone_config(args):
    from runner.run.config import BackboneConfig
    return BackboneConfig(name=args.backbone, weights=args.weights, alpha=args.alpha)


REPEATS = 2  # every rate is the best of this many runs: the machine is shared, the best run is the least disturbed
PER_IMAGE_LIMIT = 400  # the per-image way is slow; it is timed on at most this many of the small photos


def timed(count_of, *args) -> float:
    """Images/s of count_of(*args) -> number of images processed; the best of REPEATS runs."""
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        count = count_of(*args)
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def plain_forward(backbone):
    """The backbone's forward pass as one traced function of a float32 image batch."""
    import tensorflow as tf
    size = backbone.image_size
    return tf.function(lambda x: backbone.model(x, training=False),
                       input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])


# -- measured in this process (TensorFlow defaults: each part has the whole machine) ------------------
def per_image(paths: list[str], forward, size: int) -> int:
    import tensorflow as tf
    from runner.features.backbones import decode_and_resize
    for path in paths:
        forward(decode_and_resize(tf.io.read_file(path), size)[None]).numpy()
    return len(paths)


def decode_ours(paths: list[str], size: int) -> int:
    from runner.features.extract import image_pipeline
    return sum(int(images.shape[0]) for images, _ in image_pipeline(paths, size, BATCH))


def decode_naive(paths: list[str], size: int) -> int:
    import tensorflow as tf

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.ensure_shape(tf.image.resize(image, (size, size)), (size, size, 3))
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return sum(int(images.shape[0]) for images in dataset.batch(BATCH).prefetch(tf.data.AUTOTUNE))


def cpu_sharing_bound(decode_rate: float, forward_rate: float) -> float:
    """Images/s when decode and forward share the CPUs: 1 / (1/decode + 1/forward)."""
    return 1 / (1 / decode_rate + 1 / forward_rate)


def pure_forward(forward, size: int, count: int) -> int:
    import tensorflow as tf
    batch = tf.random.uniform((BATCH, size, size, 3), 0, 255)
    done = 0
    while done < count:
        forward(batch).numpy()
        done += BATCH
    return done


# -- measured in child processes -----------------------------------------------------------------------
def child_pipeline(paths: list[str], args) -> float:
    """Our extraction as resume.py runs it: thread budget, then extract_missing into a fresh cache."""
    import hashlib
    from runner.run.config import TrainConfig
    from runner.features.distribute import configure_tensorflow
    configure_tensorflow(TrainConfig())
    import tensorflow as tf
    from runner.features.backbones import build_backbone
    from runner.features.cache import BottleneckCache
    from runner.data.scan import ImageRecord
    from runner.features.extract import extract_missing, extraction_forward
    backbone = build_backbone(backbone_config(args))
    records = [ImageRecord(p, p, 0, "train", hashlib.sha256(p.encode()).hexdigest()) for p in paths]
    strategy = tf.distribute.get_strategy()
    forward = extraction_forward(backbone, strategy, BATCH)  # traced once, by the warm-up: no timing includes it
    with tempfile.TemporaryDirectory() as tmp:
        def extract(chosen) -> int:
            cache = BottleneckCache(Path(tempfile.mkdtemp(dir=tmp)), backbone.cache_identity, backbone.feature_dim)
            return extract_missing(chosen, backbone, cache, strategy, BATCH, 512, "lines", forward=forward)
        extract(records[:BATCH * 2])  # tracing and thread pools, as the parent's warm-up
        return timed(extract, records)


def child_keras_peer(paths: list[str], args) -> float:
    """What a Keras user writes: image_dataset_from_directory + model.predict, TensorFlow defaults."""
    import keras
    from runner.features.backbones import build_backbone
    backbone = build_backbone(backbone_config(args))
    root = Path(args.root)
    size = backbone.image_size
    dataset = keras.utils.image_dataset_from_directory(root, image_size=(size, size), batch_size=BATCH,
                                                       shuffle=False, verbose=False)
    backbone.model.predict(dataset.take(2), verbose=0)  # warm-up
    return timed(lambda: len(backbone.model.predict(dataset, verbose=0)))


def in_child(kind: str, paths: list[str], root: Path, args) -> float:
    """Run one child measurement in a fresh process; its last stdout line is the rate."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(paths, f)
    command = [sys.executable, __file__, "--child", kind, "--list", f.name, "--root", str(root),
               "--backbone", args.backbone, "--weights", args.weights, "--alpha", str(args.alpha)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"child {kind} failed:\n{e.stdout}\n{e.stderr}") from None
    finally:
        os.unlink(f.name)
    return float(result.stdout.strip().splitlines()[-1])


# -- image sets ----------------------------------------------------------------------------------------
def link_subset(paths: list[str], root: Path) -> Path:
    """A class-folder tree of symlinks to `paths` (for image_dataset_from_directory on a subset)."""
    for path in paths:
        target = root / Path(path).parent.name / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    return root


def _enlarge(job: tuple[str, str]) -> None:
    from PIL import Image
    source, target = job
    image = Image.open(source).convert("RGB")
    sides = LARGE_SIDES if image.width >= image.height else LARGE_SIDES[::-1]
    image.resize(sides, Image.BICUBIC).save(target, "JPEG", quality=90)


def write_large(paths: list[str], root: Path) -> list[str]:
    """The photos re-encoded at 2,400 x 1,800 (phone size) into root/<class>/<name>.jpg."""
    jobs = []
    for path in paths:
        target = root / Path(path).parent.name / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((path, str(target)))
    with Pool(os.cpu_count()) as pool:
        pool.map(_enlarge, jobs)
    return [target for _, target in jobs]


def read_all(paths: list[str]) -> None:
    """Read every file once, so no timing includes the first read from disk."""
    for path in paths:
        Path(path).read_bytes()


# -- the run -------------------------------------------------------------------------------------------
def measure(args) -> dict:
    import tensorflow as tf
    from runner.features.backbones import build_backbone
    all_small = sorted(str(p) for p in Path(args.data).rglob("*.jpg"))
    small = all_small[: args.images] if args.images else all_small
    large_sources = all_small[:: max(1, len(all_small) // args.large_images)][: args.large_images]
    backbone = build_backbone(backbone_config(args))
    size = backbone.image_size
    forward = plain_forward(backbone)
    with tempfile.TemporaryDirectory() as tmp:
        small_root = Path(args.data) if len(small) == len(all_small) else link_subset(small, Path(tmp) / "small")
        start = time.perf_counter()
        large = write_large(large_sources, Path(tmp) / "large")
        print(f"wrote {len(large)} large JPEGs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        read_all(small + large)
        per_image(small[:BATCH], forward, size)  # warm-up: tracing, thread pools
        decode_ours(small[:BATCH], size)
        results = {"small": {
            "per_image": timed(per_image, small[:PER_IMAGE_LIMIT], forward, size),
            "pipeline": in_child("pipeline", small, small_root, args),
            "forward": timed(pure_forward, forward, size, len(small)),
            "decode": timed(decode_ours, small, size),
            "keras_peer": in_child("keras_peer", small, small_root, args),
        }, "large": {
            "pipeline": in_child("pipeline", large, Path(tmp) / "large", args),
            "decode_naive": timed(decode_naive, large, size),
            "decode": timed(decode_ours, large, size),
            "keras_peer": in_child("keras_peer", large, Path(tmp) / "large", args),
        }}
    results["images"] = {"small": len(small), "large": len(large)}
    return results


def report(results: dict, args) -> None:
    small, large = results["small"], results["large"]
    print(f"\n{args.backbone} alpha {args.alpha}, {os.cpu_count()} CPUs; images/s, best of {REPEATS} runs "
          f"(small: {results['images']['small']} clothing photos, per_image on the first "
          f"{min(PER_IMAGE_LIMIT, results['images']['small'])}; large: {results['images']['large']} of "
          f"them at {LARGE_SIDES[0]}x{LARGE_SIDES[1]})")
    for name, rates in (("small", small), ("large", large)):
        for key, value in rates.items():
            print(f"  {name:6s} {key:13s} {value:8.1f}")
    bound = cpu_sharing_bound(small["decode"], small["forward"])
    checks = [("small.pipeline / small.keras_peer", small["pipeline"] / small["keras_peer"], 1.3),
              ("large.pipeline / large.keras_peer", large["pipeline"] / large["keras_peer"], 2.0),
              ("large.decode / large.decode_naive", large["decode"] / large["decode_naive"], 2.5),
              ("small.pipeline / CPU-sharing bound", small["pipeline"] / bound, 0.9)]
    print(f"  CPU-sharing bound 1/(1/decode + 1/forward) = {bound:.1f} images/s")
    for name, value, target in checks:
        print(f"  {name:36s} {value:5.2f}  (target >= {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="small photos to use (0 = all 1,885)")
    parser.add_argument("--large-images", type=int, default=300, help="photos to re-encode at 2,400 x 1,800")
    parser.add_argument("--data", default=str(SHARED / "datasets" / "clothing-small"))
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"))
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
    parser.add_argument("--child", choices=("pipeline", "keras_peer"), help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        paths = json.loads(Path(args.list).read_text())
        rate = (child_pipeline if args.child == "pipeline" else child_keras_peer)(paths, args)
        print(rate)
        return
    results = measure(args)
    report(results, args)
    if args.json:
        print(json.dumps({k: {m: round(v, 1) for m, v in results[k].items()} for k in ("small", "large")}))


if __name__ == "__main__":
    main()
