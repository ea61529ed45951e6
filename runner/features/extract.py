"""Resumable bottleneck extraction: a tf.data pipeline (parallel decode, resize, prefetch) feeding the
frozen backbone under a tf.distribute strategy; finished shards go to the cache as they fill."""
from __future__ import annotations

import logging
import time

import numpy as np
import tensorflow as tf

from runner.features.backbones import Backbone, decode_and_resize, extraction_model
from runner.features.cache import BottleneckCache
from runner.features.distribute import available_cores
from runner.data.scan import ImageRecord
from runner.errors import StopRequested
from runner.ui.progress import progress

log = logging.getLogger("runner")

UNDECODABLE = "undecodable: TensorFlow could not decode the image (corrupt or unsupported variant)"


PREFETCH_BATCHES = 2  # decoded batches ready ahead of the forward pass


def image_pipeline(paths: list[str], image_size: int, batch_size: int, decode=None) -> tf.data.Dataset:
    """(image, position) batches; images that fail to decode are dropped, their positions missing. `decode`
    (a Backbone's: bytes → [S, S, 3] float32) defaults to decode_and_resize at `image_size`.

    One decoder per core this process may use, tf.data's autotuning off. With autotuning on, the same
    extraction ran at 184 or at 360 img/s from one repeat to the next (2 cores), and the end of the input
    sometimes waited 9-17 s at 0 % CPU: each such wait ended exactly on one of the autotuner's optimisation
    rounds (every 10 ms, doubling: 40.95 s after the pipeline started), so the end of the input was only
    noticed when the autotuner next updated its settings. Without it: 327-358 img/s in 4 repeats, and no
    wait in 7 runs of a loop that waited in 3 of 13 with it (README, "Thread budget"). Pinning decoding to
    a private pool with single-threaded ops halved the rate, so that is not done."""
    positions = np.arange(len(paths), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), positions))
    decode = decode or (lambda data: decode_and_resize(data, image_size))
    ds = ds.map(lambda p, i: (decode(tf.io.read_file(p)), i),
                num_parallel_calls=available_cores(), deterministic=True)
    ds = ds.ignore_errors()
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.batch(batch_size).prefetch(PREFETCH_BATCHES).with_options(options)


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
    spec = to_devices(image_pipeline([], backbone.image_size, batch_size, backbone.decode), strategy).element_spec
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
    dataset = to_devices(image_pipeline([r.path for r in todo], backbone.image_size, batch_size,
                                        backbone.decode), strategy)
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
