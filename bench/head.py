"""Head training on the cache: time per epoch and memory for a 1,000-class head on 100k cached vectors.

    python bench/head.py [--vectors 100000] [--classes 1000] [--dim 1280] [--batch-size 100]

The vectors are synthetic (class means plus noise), written as float16 shards through the real
BottleneckCache and read back memory-mapped, exactly as training reads them.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from runner.cache import BottleneckCache  # noqa: E402
from runner.config import Config  # noqa: E402
from runner.head import build_head, build_optimizer  # noqa: E402
from runner.job import make_head_step  # noqa: E402
from runner.train import BatchOrder  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.vectors).astype(np.int32)
    means = rng.normal(0, 1, (args.classes, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cache = BottleneckCache(Path(tmp), {"bench": True}, args.dim)
        keys = [f"{i:064x}" for i in range(args.vectors)]
        start = time.perf_counter()
        for lo in range(0, args.vectors, 4096):
            hi = min(lo + 4096, args.vectors)
            vectors = means[labels[lo:hi]] + rng.normal(0, 2, (hi - lo, args.dim)).astype(np.float32)
            cache.add_shard(keys[lo:hi], vectors)
        write_seconds = time.perf_counter() - start
        cache = BottleneckCache(Path(tmp), {"bench": True}, args.dim)  # reopen: memory-mapped reads only
        rss_after_open = current_rss_mib()
        table = cache.table(keys)
        config = Config()
        config.train.batch_size = args.batch_size
        strategy = tf.distribute.get_strategy()
        head = build_head(args.classes, args.dim, config.head, 0)
        optimizer = build_optimizer(config.train, head.trainable_variables)
        step_fn = make_head_step(head, optimizer, strategy, config, args.classes)
        order = BatchOrder(len(table), args.batch_size, 0)
        weights = np.ones(args.batch_size, np.float32)
        steps_per_epoch = args.vectors // args.batch_size
        times = []
        for epoch in range(args.epochs):
            start = time.perf_counter()
            gather = 0.0
            for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
                t0 = time.perf_counter()
                rows = order.indices(step)
                features = table.gather(rows)
                gather += time.perf_counter() - t0
                loss, _ = step_fn(tf.constant(features), tf.constant(labels[rows]), tf.constant(weights),
                                  tf.constant([0, step], tf.int64))
            float(loss)
            times.append((time.perf_counter() - start, gather))
        rss_end = current_rss_mib()
        size_mib = sum(p.stat().st_size for p in Path(tmp).rglob("*.npy")) / 2 ** 20
    print(f"\n{args.classes}-class head on {args.vectors} cached {args.dim}-d float16 vectors "
          f"({size_mib:.0f} MiB on disk, written in {write_seconds:.1f} s), batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    for i, (total, gather) in enumerate(times):
        note = " (includes tracing)" if i == 0 else ""
        print(f"  epoch {i + 1}: {total:6.1f} s ({steps_per_epoch} steps, {steps_per_epoch / total:.0f} steps/s; "
              f"gathering from the memory-mapped cache {gather:.1f} s){note}")
    print(f"  RSS after opening the cache {rss_after_open:.0f} MiB; after training {rss_end:.0f} MiB; "
          f"peak (incl. writing the shards) {peak_rss_mib():.0f} MiB "
          f"(the vectors alone would be {args.vectors * args.dim * 4 / 2 ** 20:.0f} MiB as float32)")


if __name__ == "__main__":
    main()
