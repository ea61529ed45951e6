"""Resumable bottleneck extraction: a tf.data pipeline (parallel decode, resize, prefetch) feeding the
frozen backbone under a tf.distribute strategy; finished shards go to the cache as they fill."""
from __future__ import annotations

import logging
import time

import numpy as np
import tensorflow as tf

from runner.backbones import Backbone, decode_and_resize, extraction_model
from runner.cache import BottleneckCache
from runner.data import ImageRecord
from runner.errors import StopRequested
from runner.progress import progress

log = logging.getLogger("runner")

UNDECODABLE = "undecodable: TensorFlow could not decode the image (corrupt or unsupported variant)"


def image_pipeline(paths: list[str], image_size: int, batch_size: int) -> tf.data.Dataset:
    """(image, position) batches; images that fail to decode are dropped, their positions missing.

    Decoding runs on tf.data's own autotuned pool; pinning it to a private pool of a fixed size, with
    single-threaded ops, halved the decode rate on 2 shared cores, so it is left to tf.data."""
    positions = np.arange(len(paths), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), positions))
    ds = ds.map(lambda p, i: (decode_and_resize(tf.io.read_file(p), image_size), i),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def to_devices(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy, device: str | None = None):
    """The batches placed where the forward pass runs: MirroredStrategy distributes them itself; otherwise
    they are prefetched onto the accelerator (`device`, default the first GPU) so it never waits for a copy."""
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return strategy.experimental_distribute_dataset(dataset)
    gpus = tf.config.list_logical_devices("GPU")
    device = device or (gpus[0].name if gpus else None)
    if device is None:
        return dataset
    return dataset.apply(tf.data.experimental.prefetch_to_device(device, buffer_size=2))


def make_forward(backbone: Backbone, strategy: tf.distribute.Strategy, element_spec=None):
    """A compiled function: a distributed image batch → (all vectors, all positions) on the host.

    Traced once for `element_spec` (the dataset's, any batch size) so the last, smaller batch costs no
    second trace; with backbone.mixed_precision it computes in float16, with backbone.xla it is compiled
    by XLA."""
    model = extraction_model(backbone)

    @tf.function(jit_compile=True if backbone.config.xla else None)
    def replica_forward(images):
        return model(images, training=False)

    def forward(images, positions):
        vectors = strategy.run(replica_forward, args=(images,))
        return (strategy.gather(vectors, axis=0), strategy.gather(positions, axis=0))
    return tf.function(forward, input_signature=None if element_spec is None else list(element_spec))


def extraction_forward(backbone: Backbone, strategy: tf.distribute.Strategy, batch_size: int):
    """The compiled forward for extraction's batches (make one to reuse it over several extractions)."""
    spec = to_devices(image_pipeline([], backbone.image_size, batch_size), strategy).element_spec
    return make_forward(backbone, strategy, spec)


SLOW_END_S = 2.0


def report_slow_end(pipeline_end_s: float, last_write_s: float) -> None:
    """Name the phase when the end of extraction is slow (seen once as a 13-28 s pause at 0 % CPU)."""
    if pipeline_end_s > SLOW_END_S:
        log.warning("the image pipeline took %.1f s to end after its last batch", pipeline_end_s)
    if last_write_s > SLOW_END_S:
        log.warning("writing the last cache shard took %.1f s (fsync on a slow or busy disk)", last_write_s)


def extract_missing(records: list[ImageRecord], backbone: Backbone, cache: BottleneckCache,
                    strategy: tf.distribute.Strategy, batch_size: int, shard_size: int,
                    progress_mode: str = "auto", stop=None, forward=None) -> int:
    """Compute and cache the vectors of images not cached yet; returns how many were computed. A truthy
    `stop` (a StopFlag) writes the vectors computed so far as a shard and raises StopRequested. `forward` is
    an extraction_forward of the same backbone, strategy and batch size (default: a new one, traced on the
    first batch)."""
    todo, seen = [], set()
    for r in records:
        if not cache.has(r.sha256) and r.sha256 not in cache.undecodable and r.sha256 not in seen:
            todo.append(r)
            seen.add(r.sha256)
    if not todo:
        return 0
    log.info("extracting bottlenecks for %d images (%d already cached)", len(todo), len(cache))
    dataset = to_devices(image_pipeline([r.path for r in todo], backbone.image_size, batch_size), strategy)
    forward = forward or extraction_forward(backbone, strategy, batch_size)
    pending_keys, pending_vectors, next_expected = [], [], 0
    bar = progress(len(todo), "extracting bottlenecks", "img", progress_mode)

    def flush() -> None:
        nonlocal pending_keys, pending_vectors
        if pending_keys:
            cache.add_shard(pending_keys, np.concatenate(pending_vectors))
            pending_keys, pending_vectors = [], []

    failed: dict[str, str] = {}
    last_batch_at = time.monotonic()
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
        last_batch_at = time.monotonic()
    input_ended_at = time.monotonic()
    for skipped in range(next_expected, len(todo)):
        failed[todo[skipped].sha256] = UNDECODABLE
    flush()
    cache.mark_undecodable(failed)
    report_slow_end(input_ended_at - last_batch_at, time.monotonic() - input_ended_at)
    bar.update(len(failed))
    bar.close()
    return len(todo) - len(failed)
