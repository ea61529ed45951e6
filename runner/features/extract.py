"""Resumable bottleneck extraction: a tf.data pipeline (parallel decode, resize, prefetch) feeding the
frozen backbone under a tf.distribute strategy; finished shards go to the cache as they fill."""
from __future__ import annotations

import hashlib
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

UNDECODABLE = "undecodable: its bytes do not decode as an image (corrupt or unsupported variant)"


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


def encoded_pipeline(encoded: tf.data.Dataset, image_size: int, batch_size: int, decode=None) -> tf.data.Dataset:
    """image_pipeline for images given as (encoded bytes, position) (a dataset library's, see Dataset.reader)."""
    decode = decode or (lambda data: decode_and_resize(data, image_size))
    ds = encoded.map(lambda data, i: (decode(data), i),
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
                    progress_mode: str = "auto", stop=None, forward=None, read=None) -> int:
    """Compute and cache the vectors of images not cached yet; returns how many were computed. A truthy
    `stop` (a StopFlag) writes the vectors computed so far as a shard and raises StopRequested. `forward` is
    an extraction_forward of the same backbone, strategy and batch size (default: a new one, traced on the
    first batch). `read` (a Dataset.reader) gives the images' encoded bytes when they are not files.

    An image the pipeline drops is diagnosed (see `diagnose`): only bytes that do not decode are recorded as
    undecodable (for good, by content hash); an image that could not be read, or changed since the scan, is
    left out of this run only (cache.unreadable); one whose bytes decode after all is extracted again."""
    todo, seen = [], set()
    for r in records:
        if not cache.has(r.sha256) and r.sha256 not in cache.undecodable and r.sha256 not in seen:
            todo.append(r)
            seen.add(r.sha256)
    if not todo:
        return 0
    log.info("extracting bottlenecks for %d images (%d already cached)", len(todo), len(cache))
    forward = forward or extraction_forward(backbone, strategy, batch_size)
    computed = 0
    for attempt in range(1, PIPELINE_PASSES + 1):
        done, dropped = _extract_pass(todo, backbone, cache, strategy, batch_size, shard_size, progress_mode,
                                      stop, forward, read)
        computed += done
        retry, undecodable, unreadable = diagnose(dropped, backbone.image_size,
                                                  None if read is None else _reader_of_one(read))
        if attempt == PIPELINE_PASSES:
            unreadable.update({r.sha256: f"{REREAD_FAILED} ({PIPELINE_PASSES} tries)" for r in retry})
            retry = []
        cache.mark_undecodable(undecodable)
        cache.mark_unreadable(unreadable)
        if not retry:
            break
        log.info("%d images failed in the image pipeline but decode when read again: extracting them again",
                 len(retry))
        todo = retry
    return computed


PIPELINE_PASSES = 2     # an image dropped although its bytes decode is tried once more, then left for this run
READ_TRIES = 3          # reads of a dropped image before it is left out of this run
READ_WAIT_S = 1.0       # first wait between those reads (doubled each time); one wait covers every image
UNREADABLE = "unreadable now, left out of this run only (read again next run):"
REREAD_FAILED = f"{UNREADABLE} the image pipeline could not read it although its bytes decode"


def diagnose(dropped: list[ImageRecord], image_size: int, read_one=None
             ) -> tuple[list[ImageRecord], dict[str, str], dict[str, str]]:
    """Why the pipeline dropped these images: (those whose bytes decode after all: a read failed for a
    moment, extract them again; hash → reason for those whose bytes do not decode; hash → reason for those
    that cannot be read now or whose content changed since the scan). A read that fails with an error other
    than "not found" (a network mount's EIO, a stale handle) is tried READ_TRIES times. `read_one(record)` gives
    a record's bytes (default: its file's)."""
    read_one = read_one or (lambda record: read_image(record.path))
    retry, undecodable, unreadable = [], {}, {}
    pending, wait = list(dropped), READ_WAIT_S
    for attempt in range(1, READ_TRIES + 1):
        failed = []
        for record in pending:
            try:
                data = read_one(record)
            except FileNotFoundError:
                unreadable[record.sha256] = f"{UNREADABLE} gone since the scan (moved, renamed or deleted)"
                continue
            except OSError as e:
                failed.append(record)
                unreadable[record.sha256] = (f"{UNREADABLE} {e.strerror or e} (errno {e.errno}), "
                                                 f"{attempt} tries")
                continue
            unreadable.pop(record.sha256, None)
            if hashlib.sha256(data).hexdigest() != record.sha256:
                unreadable[record.sha256] = f"{UNREADABLE} its content changed since the scan"
            elif decodes(data, image_size):
                retry.append(record)
            else:
                undecodable[record.sha256] = UNDECODABLE
        if not failed or attempt == READ_TRIES:
            break
        time.sleep(wait)
        pending, wait = failed, wait * 2
    return retry, undecodable, unreadable


def read_image(path: str) -> bytes:
    """The bytes of one image file."""
    with open(path, "rb") as f:
        return f.read()


def _reader_of_one(read):
    """read_one for a dataset library's reader (records → tf.data of (encoded bytes, position)): a failed read
    is an OSError, as a file's would be."""
    def read_one(record: ImageRecord) -> bytes:
        try:
            data, _ = next(iter(read([record])))
        except (tf.errors.OpError, StopIteration) as e:
            raise OSError(f"the dataset could not read it ({type(e).__name__})") from None
        return data.numpy()
    return read_one


def decodes(data: bytes, image_size: int) -> bool:
    """Whether the extraction's own decoder accepts these bytes."""
    try:
        decode_and_resize(tf.constant(data), image_size)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
        return False
    return True


def _extract_pass(todo: list[ImageRecord], backbone: Backbone, cache: BottleneckCache,
                  strategy: tf.distribute.Strategy, batch_size: int, shard_size: int, progress_mode: str,
                  stop, forward, read=None) -> tuple[int, list[ImageRecord]]:
    """One pass of the pipeline over `todo`: (vectors computed and cached, the records it dropped)."""
    if read is None:
        images = image_pipeline([r.path for r in todo], backbone.image_size, batch_size, backbone.decode)
    else:
        images = encoded_pipeline(read(todo), backbone.image_size, batch_size, backbone.decode)
    dataset = to_devices(images, strategy)
    pending_keys, pending_vectors, next_expected = [], [], 0
    bar = progress(len(todo), "extracting bottlenecks", "img", progress_mode)

    def flush() -> None:
        nonlocal pending_keys, pending_vectors
        if pending_keys:
            cache.add_shard(pending_keys, np.concatenate(pending_vectors))
            pending_keys, pending_vectors = [], []

    dropped: list[ImageRecord] = []
    last_batch_at = time.monotonic()
    for images, positions in dataset:
        vectors, positions = forward(images, positions)
        vectors, positions = vectors.numpy(), positions.numpy()
        order = np.argsort(positions, kind="stable")
        for position, vector in zip(positions[order], vectors[order]):
            dropped += todo[next_expected:position]  # dropped by ignore_errors
            next_expected = position + 1
            pending_keys.append(todo[position].sha256)
            pending_vectors.append(vector[None])
            if len(pending_keys) >= shard_size:
                flush()
        bar.update(len(positions))
        if stop:  # dropped images are not diagnosed now: the next start sees them again
            flush()
            bar.close()
            raise StopRequested(stop.signal_name, "extraction")
        last_batch_at = time.monotonic()
    input_ended_at = time.monotonic()
    dropped += todo[next_expected:]
    flush()
    report_slow_end(input_ended_at - last_batch_at, time.monotonic() - input_ended_at)
    bar.update(len(dropped))
    bar.close()
    return len(todo) - len(dropped), dropped
