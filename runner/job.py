"""One training job from start to summary: restore → scan → extract → train → evaluate → summarize.

The same call starts a new run or resumes the one in `run.dir`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from runner import __version__
from runner.atomic import write_text_atomic
from runner.backbones import build_backbone
from runner.cache import BottleneckCache
from runner.checkpoints import CheckpointStore, latest_marker
from runner.config import Config, fingerprint_hash, to_toml
from runner.data import Dataset, HashIndex, check_class_sizes, scan_dataset
from runner.distribute import make_strategy
from runner.errors import IncompatibleRunError
from runner.evaluate import predict_logits, test_report
from runner.extract import extract_missing
from runner.head import build_head, build_optimizer
from runner.train import StopFlag, TrainState, run_loop

log = logging.getLogger("runner")

CHECKPOINT_DIR = "checkpoints"


def check_compatible(marker: dict | None, config: Config, classes: list[str], run_dir: Path) -> None:
    """Refuse to continue a run whose checkpoint was made with other classes or another backbone."""
    if marker is None:
        return
    fix = (f"To start a new run, use another run directory (--set run.dir=...) or delete {run_dir}; "
           f"to continue this one, go back to its settings (see {run_dir}/config.toml).")
    if marker.get("classes") != classes:
        old, new = marker.get("classes", []), classes
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        raise IncompatibleRunError(
            f"{run_dir} was trained on {len(old)} classes, data.dir now has {len(new)} "
            f"(added: {added[:5] or 'none'}, removed: {removed[:5] or 'none'}). {fix}")
    old_fp, new_fp = marker.get("fingerprint", {}), config.compatibility_fingerprint()
    if old_fp != new_fp:
        changed = [f"{k}: {old_fp.get(k)!r} → {new_fp.get(k)!r}" for k in new_fp if old_fp.get(k) != new_fp.get(k)]
        raise IncompatibleRunError(f"{run_dir} holds a checkpoint made with other settings "
                                   f"({'; '.join(changed)}). {fix}")


def trim_metrics(metrics_path: Path, step: int) -> None:
    """Drop metric lines newer than the restored step (work lost with the crash is redone)."""
    if not metrics_path.exists():
        return
    kept = [line for line in metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))


def _split_arrays(dataset: Dataset, cache: BottleneckCache, split: str):
    records = dataset.split(split)
    table = cache.table([r.sha256 for r in records])
    labels = np.array([r.label for r in records], np.int32)
    return records, table, labels


class Job:
    """Wires config, data, cache, head, checkpoints and sync for one run directory."""

    def __init__(self, config: Config, sync, stop: StopFlag | None = None):
        self.config, self.sync = config, sync
        self.run_dir = config.run_dir
        self.stop = stop if stop is not None else StopFlag()

    def run(self) -> dict:
        """Train (or continue) to train.steps and return the summary written to summary.json."""
        config, run_dir = self.config, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_dir = run_dir / CHECKPOINT_DIR
        local_marker = latest_marker(checkpoint_dir)
        if local_marker is None and self.sync.enabled:
            restored_step = self.sync.restore_latest()
            if restored_step is not None:
                log.info("downloaded snapshot of step %d from %s", restored_step, config.sync.backend)
        mode = config.train.progress
        dataset = scan_dataset(Path(config.data.dir), config.split.validation_percent, config.split.test_percent,
                               HashIndex(config.cache_dir / "file-hashes.json"),
                               config.data.min_images_per_class, mode)
        check_compatible(latest_marker(checkpoint_dir), config, dataset.classes, run_dir)
        write_text_atomic(run_dir / "config.toml", to_toml(config))
        write_text_atomic(run_dir / "labels.json", json.dumps(dataset.classes, indent=1))

        strategy = make_strategy(config.train)
        with strategy.scope():
            backbone = build_backbone(config.backbone)
        cache = BottleneckCache(config.cache_dir, backbone.cache_identity, backbone.feature_dim, config.cache.dtype)
        backbone_info = {"name": backbone.name, "weights": config.backbone.weights,
                         "image_size": backbone.image_size, "alpha": config.backbone.alpha,
                         "feature_dim": backbone.feature_dim}
        computed = extract_missing(dataset.images, backbone, cache, strategy, config.cache.batch_size,
                                   config.cache.shard_size, mode)
        dataset = dataset.without(cache.undecodable)
        check_class_sizes(dataset, config.data.min_images_per_class)
        for item in dataset.skipped:
            log.warning("skipped %s: %s", item["path"], item["reason"])
        del backbone

        train_records, train_table, train_labels = _split_arrays(dataset, cache, "train")
        val_records, val_table, val_labels = _split_arrays(dataset, cache, "validation")
        test_records, test_table, test_labels = _split_arrays(dataset, cache, "test")
        num_classes = len(dataset.classes)
        with strategy.scope():
            head = build_head(num_classes, cache.dim, config.head, config.train.seed)
            optimizer = build_optimizer(config.train, head)
            state = TrainState(tf.Variable(0, dtype=tf.int64, name="global_step"),
                               tf.Variable(config.train.seed, dtype=tf.int64, name="data_seed"))
        checkpoint = tf.train.Checkpoint(head=head, optimizer=optimizer, global_step=state.step,
                                         data_seed=state.seed)
        store = CheckpointStore(checkpoint_dir, checkpoint, config.checkpoint.max_to_keep)
        restored = store.restore()
        resumed_from = list(restored.marker.get("resumed_from", [])) if restored else []
        metrics_path = run_dir / "metrics.jsonl"
        if restored:
            age = time.time() - restored.marker.get("saved_at", time.time())
            print(f"resumed from step {restored.step}, checkpoint {_age(age)} old", flush=True)
            resumed_from.append(restored.step)
            trim_metrics(metrics_path, restored.step)
            if int(state.seed.numpy()) != config.train.seed:
                log.warning("train.seed is %d but this run started with seed %d; keeping %d so the data "
                            "order continues exactly", config.train.seed, int(state.seed.numpy()),
                            int(state.seed.numpy()))
        elif checkpoint_dir.exists() and store.steps():
            raise IncompatibleRunError(f"no checkpoint in {checkpoint_dir} could be loaded (see the "
                                       f"warnings above); move that folder away to start over.")
        else:
            metrics_path.unlink(missing_ok=True)
        log.info("%d classes; %d train / %d validation / %d test images; %d skipped; %d vectors computed "
                 "now, %d cached", num_classes, len(train_records), len(val_records), len(test_records),
                 len(dataset.skipped), computed, len(cache))

        base_marker = {"fingerprint": config.compatibility_fingerprint(),
                       "fingerprint_hash": fingerprint_hash(config.compatibility_fingerprint()),
                       "classes": dataset.classes, "backbone": backbone_info,
                       "resumed_from": resumed_from, "runner_version": __version__}

        def save_checkpoint(step: int, metrics: dict) -> None:
            files = store.save(step, dict(base_marker, metrics=metrics))
            log.info("checkpoint saved at step %d", step)
            self.sync.on_checkpoint(step, [f"{CHECKPOINT_DIR}/{f}" for f in files] + [
                "labels.json", "config.toml", "metrics.jsonl"], dict(metrics, step=step), cache.files())

        val_features = val_table.all()
        result = run_loop(config, head, optimizer, strategy, state, train_table, train_labels, val_features,
                          val_labels, save_checkpoint, metrics_path, self.stop)
        if result.stopped_by:
            return {"stopped_by": result.stopped_by, "global_step": result.step}

        report = test_report(predict_logits(head, test_table.all()), test_labels, dataset.classes,
                             [r.relpath for r in test_records])
        write_text_atomic(run_dir / "test_report.json", json.dumps(report, indent=1))
        summary = {
            "test_accuracy": report["test_accuracy"], "test_loss": report["test_loss"],
            "val_accuracy": result.last_eval.get("val_accuracy"), "val_loss": result.last_eval.get("val_loss"),
            "global_step": result.step, "num_classes": num_classes, "classes": dataset.classes,
            "num_train": len(train_records), "num_val": len(val_records), "num_test": len(test_records),
            "backbone": backbone_info, "resumed_from": resumed_from,
            "skipped_images": dataset.skipped, "per_class_accuracy": report["per_class_accuracy"],
            "runner_version": __version__,
        }
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
