"""Bottleneck extraction on Apache Beam (DirectRunner here, Dataflow / Flink / Spark at scale): the scan's
images not cached yet → groups of cache.shard_size, each read, decoded with the backbone's own decode, run
through the frozen backbone (loaded once per worker) and written as one content-named float16 shard into
cache.dir (a local path or gs://). The trainer then finds every vector cached.

    python -m runner.beam --config FILE [--set section.key=value ...] [Beam pipeline options]

A group's images are fixed before the pipeline starts (sorted by content hash), so a retried bundle writes
the same shard again under the same name; each file is renamed into place whole and a shard counts only once
its .npy is there, so a worker killed mid-bundle leaves no shard the trainer would read. Needs
requirements-beam.txt; see docs/beam.md."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
import uuid
from pathlib import Path

import apache_beam as beam
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from common.cli import configure_logging, run_command
from runner.features import cache_gfile as cache_files
from runner.features.distribute import CPU_BATCH
from runner.run.config import BackboneConfig, Config, load_config
from runner.data.libraries import is_library_source
from runner.data.scan import HashIndex, ImageRecord, scan_dataset
from runner.errors import DataError

log = logging.getLogger("runner")

PLAN_FOLDER = "beam-plans"  # below cache.dir: the groups of one pipeline run, deleted when it ends


def cache_root(config: Config) -> str:
    """cache.dir as written (a URL stays a URL), or RUN_DIR/cache."""
    return config.cache.dir or str(config.cache_dir)


def hash_index_for(config: Config) -> HashIndex:
    """The scan's hash index: the trainer's own for a local cache; for a bucket, one kept in the run dir."""
    root = cache_root(config)
    remote = cache_files.is_url(root)
    path = config.run_dir / "beam-file-hashes.json" if remote else Path(root) / "file-hashes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return HashIndex(path)


def plan_groups(records: list[ImageRecord], done: set[str], images_from: str, shard_size: int
                ) -> list[list[list[str]]]:
    """The images to extract as groups of [content hash, path to read], sorted by hash: one shard each.
    `done` holds hashes cached or known undecodable; `images_from` (a folder or URL) replaces data.dir in
    the paths the workers read ('' = the scanned paths)."""
    todo = {r.sha256: r for r in records if r.sha256 not in done}
    pairs = [[sha, cache_files.join(images_from, todo[sha].relpath) if images_from else todo[sha].path]
             for sha in sorted(todo)]
    return [pairs[i:i + shard_size] for i in range(0, len(pairs), shard_size)]


class ExtractShard(beam.DoFn):
    """One group of images → one cache shard; yields (content hash, reason) for images it could not use."""

    def __init__(self, backbone: dict, identity: dict, folder: str, batch_size: int, dtype: str,
                 worker_weights: str = ""):
        self.backbone, self.identity, self.folder = backbone, identity, folder
        self.batch_size, self.dtype, self.worker_weights = batch_size, dtype, worker_weights

    def setup(self):
        """Load the frozen backbone once per worker, and compile the decode and the forward pass."""
        from runner.features.backbones import build_backbone
        from runner.features.extract import make_forward
        config = BackboneConfig(**self.backbone)
        if self.worker_weights:  # e.g. gs://bucket/weights.h5: Keras reads a local file
            local = Path(tempfile.mkdtemp()) / Path(self.worker_weights).name
            tf.io.gfile.copy(self.worker_weights, str(local), overwrite=True)
            config = dataclasses.replace(config, weights=str(local))
        backbone = build_backbone(config)
        if backbone.cache_identity != self.identity:
            raise ValueError(f"the worker's backbone {backbone.cache_identity} is not the one the pipeline was "
                             f"planned for {self.identity}: --worker-weights must be the same file as "
                             f"backbone.weights")
        size = backbone.image_size
        strategy = tf.distribute.get_strategy()
        spec = (tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([None], tf.int64))
        self._forward = make_forward(backbone, strategy, spec)
        self._decode = tf.function(backbone.decode,
                                   input_signature=[tf.TensorSpec([], tf.string)])

    def read(self, path: str) -> bytes | None:
        """The bytes of one image (a local path or a URL), None when it was removed since the scan."""
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                return f.read()
        except tf.errors.NotFoundError:
            return None

    def process(self, group):
        import numpy as np
        from runner.features.extract import UNDECODABLE
        keys, images, vectors = [], [], []

        def forward():
            if images:
                batch = tf.stack(images)
                out, _ = self._forward(batch, tf.range(len(images), dtype=tf.int64))
                vectors.append(out.numpy())
                images.clear()

        for sha, path in group:
            data = self.read(path)
            if data is None or hashlib.sha256(data).hexdigest() != sha:
                log.warning("%s changed or went since the scan; left to the trainer", path)
                continue
            try:
                images.append(self._decode(tf.constant(data)))
            except tf.errors.OpError:
                yield sha, UNDECODABLE
                continue
            keys.append(sha)
            if len(images) == self.batch_size:
                forward()
        forward()
        if keys:
            self.write(keys, np.concatenate(vectors))

    def write(self, keys: list[str], vectors) -> None:
        """Write the group's shard (content-named, each file renamed into place whole)."""
        cache_files.write_shard(self.folder, keys, vectors, self.dtype)


def write_plan(root: str, groups: list) -> str:
    """The groups as a JSON-lines file below cache.dir, which every runner's workers can read."""
    folder = cache_files.join(root, PLAN_FOLDER)
    tf.io.gfile.makedirs(folder)
    path = cache_files.join(folder, f"{uuid.uuid4().hex}.jsonl")
    cache_files.put_atomic(path, "".join(json.dumps(g) + "\n" for g in groups).encode())
    return path


def build_pipeline(pipeline: beam.Pipeline, plan: str, extract: ExtractShard, root: str) -> None:
    """Read the plan → extract each group on the workers → merge undecodable images into the cache, once."""
    _ = (pipeline
         | "read plan" >> beam.io.ReadFromText(plan)
         | "parse" >> beam.Map(json.loads)
         | "spread" >> beam.Reshuffle()
         | "extract shards" >> beam.ParDo(extract)
         | "collect undecodable" >> beam.combiners.ToList()
         | "record undecodable" >> beam.Map(lambda pairs: cache_files.merge_undecodable(root, dict(pairs))))


def extract_with_beam(config: Config, beam_args: list[str], images_from: str = "", worker_weights: str = "",
                      extract_class=ExtractShard) -> int:
    """Scan data.dir, run the pipeline over the images not cached, and return how many vectors it added."""
    from runner.features.backbones import build_backbone
    if is_library_source(config.data.dir):
        raise DataError(f"data.dir {config.data.dir}: Beam extraction reads image files, and this dataset is read "
                        f"from a dataset library; extract with `python resume.py` instead (it caches the same "
                        f"vectors), or write the dataset to class folders for Beam.")
    root = cache_root(config)
    data = config.data
    dataset = scan_dataset(Path(data.dir), config.split.validation_percent, config.split.test_percent,
                           hash_index_for(config), data.min_images_per_class, config.train.progress,
                           layout=data.layout, labels=data.labels, labels_columns=data.labels_columns)
    backbone = build_backbone(config.backbone)  # the identity and dimension the workers' shards carry
    folder = cache_files.ensure_identity(root, backbone.cache_identity, backbone.feature_dim)
    before = cache_files.cached_keys(folder)
    groups = plan_groups(dataset.images, before | set(cache_files.read_undecodable(root)), images_from,
                         config.cache.shard_size)
    if not groups:
        log.info("every one of the %d images is cached already; 0 vectors computed now", len(dataset.images))
        return 0
    log.info("extracting %d images in %d shards on Beam (%d cached)", sum(map(len, groups)), len(groups),
             len(before))
    plan = write_plan(root, groups)
    extract = extract_class(dataclasses.asdict(config.backbone), backbone.cache_identity, folder,
                            config.cache.batch_size or CPU_BATCH, config.cache.dtype, worker_weights)
    try:
        with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
            build_pipeline(pipeline, plan, extract, root)
    finally:
        tf.io.gfile.remove(plan)
        if not tf.io.gfile.listdir(cache_files.join(root, PLAN_FOLDER)):
            tf.io.gfile.rmtree(cache_files.join(root, PLAN_FOLDER))
    computed = len(cache_files.cached_keys(folder) - before)
    log.info("%d vectors computed now on Beam; %s holds the vectors of %d images", computed, folder,
             computed + len(before))
    return computed


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m runner.beam", description="Extract the bottleneck cache on Apache Beam; any argument "
        "not listed here is a Beam pipeline option (--runner, --direct_num_workers, --project, ...).")
    parser.add_argument("--config", help="TOML file with the run's settings (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting; repeatable")
    parser.add_argument("--images-from", default="", metavar="URL",
                        help="folder or gs:// URL the workers read CLASS/FILE from instead of data.dir")
    parser.add_argument("--worker-weights", default="", metavar="URL",
                        help="the backbone.weights file where the workers can read it (e.g. gs://...)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.debug)

    def command() -> int:
        config = load_config(args.config, args.set)
        extract_with_beam(config, beam_args, args.images_from, args.worker_weights)
        return 0
    return run_command(command, args.debug)
