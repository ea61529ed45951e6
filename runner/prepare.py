"""Everything a run does before training: restore from sync, scan the data, check the run can continue,
build the backbone, extract the missing bottlenecks, and split the cached vectors.

`prepare` returns a `Prepared` with all of it; the job (runner/job.py) then only trains and finishes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from common.errors import TransientError
from common.files import write_text_atomic
from runner import __version__
from runner.features.backbones import REGISTRY, Backbone, build_backbone, suggest_backbone
from runner.features.distribute import extraction_batch_size
from runner.features.cache import BottleneckCache
from runner.run.config import Config, to_toml
from runner.data.scan import Dataset, HashIndex, check_class_sizes, scan_dataset
from runner.run.dataversion import DataFingerprint, finish_interrupted_archive, follow_data
from runner.run.records import BackboneInfo, CheckpointMarker, RunVersion
from runner.errors import DataError, IncompatibleRunError
from runner.features.extract import extract_missing
from runner.run.rundir import STAGES, RunDir
from runner.data.libraries import is_library_source, scan_library
from runner.data.sources import local_data_dir
from runner.training.stages import Split
from runner.training.loop import StopFlag

log = logging.getLogger("runner")


@dataclass
class Prepared:
    """A run ready to train: its images (undecodable ones skipped), backbone, cache and splits."""
    dataset: Dataset
    backbone: Backbone
    cache: BottleneckCache
    hash_index: HashIndex
    train: Split
    val: Split
    test: Split
    computed: int                      # vectors computed by this process
    version: RunVersion                # the data version being trained, and the step it starts after
    fingerprint: DataFingerprint       # the data it trains on (recorded in every checkpoint marker)

    def cache_files(self) -> list[str]:
        """What sync ships of the cache: its immutable shards and the file-hash index's content-named copy."""
        return self.cache.files() + [n for n in [self.hash_index.shipped_name] if n]

    def backbone_info(self) -> BackboneInfo:
        """The backbone as summary.json, checkpoint markers and the export describe it."""
        b, config = self.backbone, self.backbone.config
        return BackboneInfo(b.name, config.weights, b.image_size, config.alpha, b.feature_dim)

    def marker(self, settings_fingerprint: dict) -> CheckpointMarker:
        """What every checkpoint marker of this run records besides its stage's own fields; `settings_fingerprint`
        names the settings a resume of the stage must keep."""
        return CheckpointMarker(classes=tuple(self.dataset.classes), backbone=self.backbone_info(),
                                runner_version=__version__, data=self.fingerprint.digest_record(),
                                data_version=self.version.number, fingerprint=settings_fingerprint)


def restore_from_sync(config: Config, run: RunDir, sync, stop: StopFlag) -> None:
    """A run directory without a checkpoint is first filled from sync's newest snapshot, if there is one."""
    if run.latest() is not None or not sync.enabled:
        return
    with stop.raising("the snapshot restore"):  # each restored file is renamed into place whole
        restored_step = sync.restore_latest()
    if restored_step is not None:
        log.info("downloaded the snapshot of step %d from sync (%s)", restored_step, config.sync.backend)
        for stage in STAGES:  # a snapshot carries checkpoints, not TensorFlow's state file naming them
            run.stage(stage).write_state(config.checkpoint.max_to_keep)


def check_compatible(marker: CheckpointMarker | None, fingerprint: dict, classes: list[str], run: RunDir,
                     sync_folder: str = "") -> None:
    """Refuse to continue a run whose checkpoint was made with other classes or another backbone
    (`sync_folder`: where sync restores snapshots from, '' when sync is off)."""
    if marker is None:
        return
    run_dir = run.path
    fix = (f"To start a new run, use another run directory (--set run.dir=...) or delete {run_dir}; "
           f"to continue this one, go back to its settings (see {run.config}).")
    if sync_folder:
        fix = (f"Sync restores a new run directory from sync.folder {sync_folder!r}, which holds that run: to "
               f"start a new run, use another sync.folder (--set sync.folder=...) and another run.dir "
               f"(--set run.dir=...); to continue that run, go back to its settings (see {run.config}).")
    if list(marker.classes) != list(classes):
        old, new = marker.classes, classes
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        raise IncompatibleRunError(
            f"{run_dir} was trained on {len(old)} classes, data.dir now has {len(new)} "
            f"(added: {added[:5] or 'none'}, removed: {removed[:5] or 'none'}). {fix}")
    old_fp, fingerprint = _resolved(dict(marker.fingerprint)), _resolved(fingerprint)
    if old_fp != fingerprint:
        changed = [f"{k}: {old_fp.get(k)!r} → {fingerprint.get(k)!r}" for k in fingerprint
                   if old_fp.get(k) != fingerprint.get(k)]
        raise IncompatibleRunError(f"{run_dir} holds a checkpoint made with other settings "
                                   f"({'; '.join(changed)}). {fix}")


def _resolved(fingerprint: dict) -> dict:
    """A compatibility fingerprint with backbone.image_size = 0 read as the backbone's default size (the same
    input either way), so 0 and the default it stands for compare equal."""
    spec = REGISTRY.get(fingerprint.get("backbone"))
    if fingerprint.get("image_size") == 0 and spec is not None:
        return dict(fingerprint, image_size=spec.default_size)
    return fingerprint


def check_run_can_continue(config: Config, run: RunDir, classes: list[str], sync_enabled: bool) -> None:
    """Both stages' newest checkpoints must match these classes and settings."""
    sync_folder = config.sync.folder if sync_enabled else ""
    for stage, fingerprint in (("head", config.compatibility_fingerprint()),
                               ("finetune", config.fine_tune_fingerprint())):
        latest = run.stage(stage).latest()
        check_compatible(latest.marker if latest else None, fingerprint, classes, run, sync_folder)


def scan(config: Config, stop: StopFlag) -> tuple[Dataset, HashIndex, dict[str, list]]:
    """The images of data.dir, hashed (unchanged files by the hash index, without reading them) and split;
    also the previous scan's entries (relative path → [size, mtime, sha256]), to say what changed."""
    hash_index = HashIndex(config.cache_dir / "file-hashes.json")
    previous = dict(hash_index.entries)
    if is_library_source(config.data.dir):
        return scan_library(config, hash_index, stop), hash_index, previous
    data = config.data
    dataset = scan_dataset(local_data_dir(data, config.train.progress, stop), config.split.validation_percent,
                           config.split.test_percent, hash_index, data.min_images_per_class, config.train.progress,
                           stop, layout=data.layout, labels=data.labels, labels_columns=data.labels_columns)
    return dataset, hash_index, previous


def record_settings(config: Config, run: RunDir, classes: list[str]) -> None:
    """Keep the resolved settings and the label map in the run directory (rewritten only when they change)."""
    _write_if_changed(run.config, to_toml(config))
    _write_if_changed(run.labels, json.dumps(classes, indent=1))


def extract(config: Config, dataset: Dataset, backbone: Backbone, strategy, stop: StopFlag
            ) -> tuple[Dataset, BottleneckCache, int]:
    """Cache the vectors of every image not cached yet; (the dataset without the images that do not decode or
    could not be read now, the cache, how many vectors were computed)."""
    cache = BottleneckCache(config.cache_dir, backbone.cache_identity, backbone.feature_dim, config.cache.dtype)
    gpus = tf.config.list_physical_devices("GPU")
    advice = suggest_backbone(config.backbone, gpus)
    if advice:
        log.info(advice)
    computed = extract_missing(dataset.images, backbone, cache, strategy,
                               extraction_batch_size(config.cache.batch_size),
                               config.cache.shard_size, config.train.progress, stop, read=dataset.reader)
    scanned = len(dataset.skipped)
    dataset = dataset.without(cache.left_out())
    for item in dataset.skipped[scanned:]:  # the scan already named the files it skipped
        log.warning("skipped %s: %s", item["path"], item["reason"])
    try:
        check_class_sizes(dataset, config.data.min_images_per_class)
    except DataError as e:
        if not cache.unreadable:
            raise
        raise TransientError(f"{e} But {len(cache.unreadable)} image(s) could not be read during extraction "
                             f"(moved or renamed since the scan, or a mount that failed to serve them; see the "
                             f"warnings above). They are not marked as damaged: run the same command again and "
                             f"they are scanned and read again.") from None
    return dataset, cache, computed


def prepare(config: Config, run: RunDir, sync, stop: StopFlag, strategy,
            make_backbone=build_backbone, on_backbone=None) -> Prepared:
    """Restore, scan, check, build the backbone (under `strategy`), extract and split: a run ready to train.
    `on_backbone(backbone)` is called once it is built (its weights downloaded), before extraction."""
    run.path.mkdir(parents=True, exist_ok=True)
    finish_interrupted_archive(run)  # before the restore: an archive moves the checkpoints away
    restore_from_sync(config, run, sync, stop)
    dataset, hash_index, previous_scan = scan(config, stop)
    version, fingerprint = follow_data(run, dataset, previous_scan), DataFingerprint.of(dataset)
    check_run_can_continue(config, run, dataset.classes, sync.enabled)
    record_settings(config, run, dataset.classes)
    with strategy.scope():
        backbone = make_backbone(config.backbone)
    if on_backbone is not None:
        on_backbone(backbone)
    dataset, cache, computed = extract(config, dataset, backbone, strategy, stop)
    train, val, test = (Split.of(dataset, cache, name) for name in ("train", "validation", "test"))
    log.info("%d classes; %d train / %d validation / %d test images; %d skipped; %d vectors computed "
             "now, %d cached", len(dataset.classes), len(train.records), len(val.records),
             len(test.records), len(dataset.skipped), computed, len(cache))
    return Prepared(dataset, backbone, cache, hash_index, train, val, test, computed, version, fingerprint)


def _write_if_changed(path: Path, text: str) -> None:
    """Write a record atomically unless it already holds exactly this text."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except FileNotFoundError:
        pass
    write_text_atomic(path, text)
