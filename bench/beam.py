"""Beam extraction's rate per worker process, on DirectRunner, from the shared clothing photos.

    python bench/beam.py [--small 40] [--large 240] [--workers 1] [--json]
    taskset -c 0 python bench/beam.py --json       # one worker on one core: images/s per worker core

Runs `runner.features.beam.extract_with_beam` twice into fresh caches, on `--small` and on `--large` images, and
reports the marginal rate (large - small) / (t_large - t_small): the images/s of the workers once started,
without the fixed start-up cost (TensorFlow import and backbone load in each worker, pipeline set-up), which
is reported separately; then the trainer's own extraction on the same photos in this process, under the same
load and core set, so `beam_over_local` is comparable from one machine (and one load) to
another. With --json the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def copy_photos(root: Path, count: int) -> Path:
    """The first `count` photos of clothing-small, taken round-robin over its classes."""
    folders = sorted(p for p in CLOTHING.iterdir() if p.is_dir())
    files = {f: sorted(f.iterdir()) for f in folders}
    taken = 0
    for i in range(max(map(len, files.values()))):
        for folder in folders:
            if taken < count and i < len(files[folder]):
                (root / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(files[folder][i], root / folder.name / files[folder][i].name)
                taken += 1
    return root


def timed_run(count: int, workers: int, scratch: Path) -> float:
    """Seconds for one pipeline run over `count` photos into a fresh cache."""
    from runner.features.beam import extract_with_beam
    from runner.run.config import load_config
    data = copy_photos(scratch / f"data-{count}", count)
    run_dir = scratch / f"run-{count}"
    config = load_config(None, [f"data.dir={data}", f"run.dir={run_dir}", "backbone.name=mobilenet",
                                f"backbone.weights={WEIGHTS}", "backbone.alpha=0.25", "backbone.image_size=224",
                                "cache.shard_size=40", "data.min_images_per_class=1", "train.progress=lines",
                                "split.validation_percent=10", "split.test_percent=10"])
    start = time.perf_counter()
    computed = extract_with_beam(config, ["--direct_num_workers", str(workers),
                                          "--direct_running_mode", "multi_processing"])
    seconds = time.perf_counter() - start
    assert computed == count, f"{computed} vectors computed of {count}"
    return seconds


def local_rate(count: int, scratch: Path) -> float:
    """Images/s of the trainer's own extraction (runner.features.extract) on the same photos, in this process, after
    the backbone is built: the reference the Beam rate is a fraction of, measured under the same load."""
    import tensorflow as tf
    from runner.features.backbones import build_backbone
    from runner.features.cache import BottleneckCache
    from runner.run.config import load_config
    from runner.data.scan import HashIndex, scan_dataset
    from runner.features.extract import extract_missing
    config = load_config(None, [f"data.dir={scratch / f'data-{count}'}", "backbone.name=mobilenet",
                                f"backbone.weights={WEIGHTS}", "backbone.alpha=0.25", "backbone.image_size=224"])
    dataset = scan_dataset(Path(config.data.dir), 10, 10, HashIndex(scratch / "local-hashes.json"), 1, "lines")
    backbone = build_backbone(config.backbone)
    cache = BottleneckCache(scratch / "local-cache", backbone.cache_identity, backbone.feature_dim)
    start = time.perf_counter()
    extract_missing(dataset.images, backbone, cache, tf.distribute.get_strategy(), config.cache.batch_size,
                    config.cache.shard_size, "lines")
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--large", type=int, default=240)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = timed_run(args.small, args.workers, Path(tmp))
        large = timed_run(args.large, args.workers, Path(tmp))
        local = local_rate(args.large, Path(tmp))
    cores = len(os.sched_getaffinity(0))
    rate = (args.large - args.small) / (large - small)
    result = {"workers": args.workers, "cores": cores, "small_images": args.small, "small_s": round(small, 1),
              "large_images": args.large, "large_s": round(large, 1), "images_per_s": round(rate, 1),
              "images_per_s_per_core": round(rate / cores, 1),
              "startup_s": round(small - args.small / rate, 1), "local_images_per_s": round(local, 1),
              "beam_over_local": round(rate / local, 2), "load_average_1min": round(os.getloadavg()[0], 1)}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
