"""Resumable bottleneck extraction: a tf.data pipeline (parallel decode, resize, prefetch) feeding the
frozen backbone under a tf.distribute strategy; finished shards go to the cache as they fill."""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from runner.backbones import Backbone, decode_and_resize
from runner.cache import BottleneckCache
from runner.data import ImageRecord
from runner.errors import StopRequested
from runner.progress import progress

log = logging.getLogger("runner")

UNDECODABLE = "undecodable: TensorFlow could not decode the image (corrupt or unsupported variant)"


def image_pipeline(paths: list[str], image_size: int, batch_size: int) -> tf.data.Dataset:
    """(image, position) batches; images that fail to decode are dropped, their positions missing."""
    positions = np.arange(len(paths), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((paths, positions))
    ds = ds.map(lambda p, i: (decode_and_resize(tf.io.read_file(p), image_size), i),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_forward(backbone: Backbone, strategy: tf.distribute.Strategy):
    """A compiled function: a distributed image batch → (all vectors, all positions) on the host."""
    @tf.function
    def forward(images, positions):
        vectors = strategy.run(lambda x: backbone.model(x, training=False), args=(images,))
        return (strategy.gather(vectors, axis=0), strategy.gather(positions, axis=0))
    return forward


def extract_missing(records: list[ImageRecord], backbone: Backbone, cache: BottleneckCache,
                    strategy: tf.distribute.Strategy, batch_size: int, shard_size: int,
                    progress_mode: str = "auto", stop=None) -> int:
    """Compute and cache the vectors of images not cached yet; returns how many were computed. A truthy
    `stop` (a StopFlag) writes the vectors computed so far as a shard and raises StopRequested."""
    todo, seen = [], set()
    for r in records:
        if not cache.has(r.sha256) and r.sha256 not in cache.undecodable and r.sha256 not in seen:
            todo.append(r)
            seen.add(r.sha256)
    if not todo:
        return 0
    log.info("extracting bottlenecks for %d images (%d already cached)", len(todo), len(cache))
    dataset = strategy.experimental_distribute_dataset(
        image_pipeline([r.path for r in todo], backbone.image_size, batch_size))
    forward = make_forward(backbone, strategy)
    pending_keys, pending_vectors, next_expected = [], [], 0
    bar = progress(len(todo), "extracting bottlenecks", "img", progress_mode)

    def flush() -> None:
        nonlocal pending_keys, pending_vectors
        if pending_keys:
            cache.add_shard(pending_keys, np.concatenate(pending_vectors))
            pending_keys, pending_vectors = [], []

    failed: dict[str, str] = {}
    for images, positions in dataset:
        vectors, positions = forward(images, positions)
        vectors, positions = vectors.numpy(), positions.numpy()
        order = np.argsort(positions, kind="stable")
        for position, vector in zip(positions[order], vectors[order]):
            for skipped in range(next_expected, position):  # dropped by ignore_errors
                failed[todo[skipped].sha256] = UNDECODABLE
            next_expected = position + 1
            pending_keys.append(todo[position].sha256)
            pending_vectors.append(vector[None])
            if len(pending_keys) >= shard_size:
                flush()
                cache.mark_undecodable(failed)
        bar.update(len(positions))
        if stop:
            flush()
            cache.mark_undecodable(failed)
            bar.close()
            raise StopRequested(stop.signal_name, "extraction")
    for skipped in range(next_expected, len(todo)):
        failed[todo[skipped].sha256] = UNDECODABLE
    flush()
    cache.mark_undecodable(failed)
    bar.update(len(failed))
    bar.close()
    return len(todo) - len(failed)
