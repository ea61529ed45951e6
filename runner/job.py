"""One training job from start to summary: restore → scan → extract → head → fine-tune → evaluate.

The same call starts a new run or resumes the one in `run.dir`, in whichever stage it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from runner import __version__
from common.files import write_text_atomic
from runner.backbones import Backbone, build_backbone
from runner.cache import BottleneckCache
from runner.checkpoints import CheckpointStore
from runner.config import Config, to_toml
from runner.data import Dataset, HashIndex, ImageRecord, check_class_sizes, scan_dataset
from runner.distribute import make_strategy
from runner.errors import IncompatibleRunError, RunnerError
from runner.evaluate import loss_and_accuracy, predict_logits, test_report
from runner.export import export_run
from runner.extract import extract_missing
from runner.finetune import ImageBatches, ImageFeatures, unfreeze_top
from runner.head import build_head, build_optimizer, feature_statistics
from runner.report import write_report
from runner.rundir import CheckpointRef, RunDir, read_json, write_json
from runner.search import HeadSearch, build_search, candidate_grid, head_budget
from runner.train import (BatchOrder, Stage, StopFlag, TrainState, class_weight_vector, make_train_step,
                          run_stage)
from sync import HandOver

log = logging.getLogger("runner")


def check_compatible(marker: dict | None, fingerprint: dict, classes: list[str], run: RunDir) -> None:
    """Refuse to continue a run whose checkpoint was made with other classes or another backbone."""
    if marker is None:
        return
    run_dir = run.path
    fix = (f"To start a new run, use another run directory (--set run.dir=...) or delete {run_dir}; "
           f"to continue this one, go back to its settings (see {run.config}).")
    if marker.get("classes") != classes:
        old, new = marker.get("classes", []), classes
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        raise IncompatibleRunError(
            f"{run_dir} was trained on {len(old)} classes, data.dir now has {len(new)} "
            f"(added: {added[:5] or 'none'}, removed: {removed[:5] or 'none'}). {fix}")
    old_fp = marker.get("fingerprint", {})
    if old_fp != fingerprint:
        changed = [f"{k}: {old_fp.get(k)!r} → {fingerprint.get(k)!r}" for k in fingerprint
                   if old_fp.get(k) != fingerprint.get(k)]
        raise IncompatibleRunError(f"{run_dir} holds a checkpoint made with other settings "
                                   f"({'; '.join(changed)}). {fix}")


@dataclass
class Split:
    """One split's images, their labels and (for the head) their cached vectors."""
    records: list[ImageRecord]
    labels: np.ndarray
    table: object

    @classmethod
    def of(cls, dataset: Dataset, cache: BottleneckCache, name: str) -> "Split":
        records = dataset.split(name)
        return cls(records, np.array([r.label for r in records], np.int32),
                   cache.table([r.sha256 for r in records]))

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]


class Job:
    """Wires config, data, cache, stages, checkpoints and sync for one run directory."""

    def __init__(self, config: Config, sync, stop: StopFlag | None = None):
        self.config, self.sync = config, sync
        self.rundir = RunDir(config.run_dir)
        self.stop = stop if stop is not None else StopFlag()
        self._list_cache_files = lambda: []

    # -- preparation -------------------------------------------------------------------------------
    def _prepare_data(self) -> Dataset:
        config, run = self.config, self.rundir
        run.path.mkdir(parents=True, exist_ok=True)
        if run.latest() is None and self.sync.enabled:
            restored_step = self.sync.restore_latest()
            if restored_step is not None:
                log.info("downloaded the snapshot of step %d from sync (%s)", restored_step, config.sync.backend)
        dataset = scan_dataset(Path(config.data.dir), config.split.validation_percent, config.split.test_percent,
                               HashIndex(config.cache_dir / "file-hashes.json"),
                               config.data.min_images_per_class, config.train.progress)
        for stage, fingerprint in (("head", config.compatibility_fingerprint()),
                                   ("finetune", config.fine_tune_fingerprint())):
            latest = run.stage(stage).latest()
            check_compatible(latest.marker if latest else None, fingerprint, dataset.classes, run)
        _write_if_changed(run.config, to_toml(config))
        _write_if_changed(run.labels, json.dumps(dataset.classes, indent=1))
        return dataset

    def _checkpoint_callback(self, store: CheckpointStore, base_marker: dict):
        def save(step: int, metrics: dict) -> None:
            checkpoint = store.save(step, dict(base_marker, metrics=metrics))
            log.info("checkpoint saved at %s step %d", checkpoint.stage, step)
            self._hand_to_sync(checkpoint)
        return save

    def _hand_to_sync(self, checkpoint: CheckpointRef, final: bool = False) -> None:
        """Give sync a finished checkpoint: the complete file list RunDir names for it."""
        files = self.rundir.hand_over(checkpoint, final)
        metrics = {k: v for k, v in checkpoint.marker.get("metrics", {}).items() if k.startswith("val_")}
        self.sync.on_checkpoint(HandOver(
            step=checkpoint.step, files=tuple(files), immutable=frozenset(f for f, fixed in files.items() if fixed),
            runner_version=__version__, metrics=metrics, cache_files=tuple(self._list_cache_files()), final=final))

    def _finish(self, summary: dict, report: dict) -> bool:
        """Write results, export and plots, then hand sync the final snapshot; False when a finished run
        is started again and nothing changed (then nothing is written, exported or uploaded)."""
        config, run = self.config, self.rundir
        export_info = run.export_info() if config.export.enabled else None
        export_current = not config.export.enabled or (export_info or {}).get("step") == summary["global_step"]
        if read_json(run.summary) == summary and read_json(run.test_report) == report and export_current:
            return False
        write_json(run.test_report, report)
        write_json(run.summary, summary)
        if config.export.enabled:
            try:
                export_run(run.path)
            except RunnerError as e:  # e.g. below export.min_accuracy: training itself succeeded
                log.error("no export: %s", e)
        write_report(run.path)
        self._hand_to_sync(run.latest(), final=True)
        return True

    def _restore(self, store: CheckpointStore, total_steps: int, setting: str,
                 stopped_early=lambda: False) -> tuple[list[int], dict]:
        """Restore the newest usable checkpoint of a stage: (the run's resume history, its stored evaluation).
        `stopped_early()` says, once restored, whether the stage ended before its total (a finished search)."""
        ref = store.restore()
        if ref is None:
            if store.stage.steps():
                raise IncompatibleRunError(f"no checkpoint in {store.dir} could be loaded (see the warnings "
                                           f"above); move that folder away to start this stage over.")
            return [], {}
        history = list(ref.marker.get("resumed_from", []))
        if ref.local_step > total_steps:
            log.warning("%s = %d is below the step this stage already reached (%d); nothing to train, and the "
                        "run keeps step %d (use another run.dir to train fewer steps)", setting, total_steps,
                        ref.local_step, ref.local_step)
        if ref.local_step < total_steps and not stopped_early():  # training continues: this is a resume
            age = time.time() - ref.marker.get("saved_at", time.time())
            where = "" if ref.stage == "head" else "fine-tuning "
            print(f"resumed from {where}step {ref.local_step}, checkpoint {_age(age)} old", flush=True)
            history.append(ref.step)
        self.rundir.metrics.trim(ref.step)
        return history, ref.marker.get("metrics", {})

    # -- the job -----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train (or continue) both stages and return the summary written to summary.json."""
        config, run = self.config, self.rundir
        dataset = self._prepare_data()
        strategy = make_strategy(config.train)
        with strategy.scope():
            backbone = build_backbone(config.backbone)
        cache = BottleneckCache(config.cache_dir, backbone.cache_identity, backbone.feature_dim, config.cache.dtype)
        self._list_cache_files = cache.files
        computed = extract_missing(dataset.images, backbone, cache, strategy, config.cache.batch_size,
                                   config.cache.shard_size, config.train.progress)
        dataset = dataset.without(cache.undecodable)
        check_class_sizes(dataset, config.data.min_images_per_class)
        for item in dataset.skipped:
            log.warning("skipped %s: %s", item["path"], item["reason"])
        train, val, test = (Split.of(dataset, cache, name) for name in ("train", "validation", "test"))
        log.info("%d classes; %d train / %d validation / %d test images; %d skipped; %d vectors computed "
                 "now, %d cached", len(dataset.classes), len(train.records), len(val.records),
                 len(test.records), len(dataset.skipped), computed, len(cache))
        backbone_info = {"name": backbone.name, "weights": config.backbone.weights,
                         "image_size": backbone.image_size, "alpha": config.backbone.alpha,
                         "feature_dim": backbone.feature_dim}
        class_weights = class_weight_vector(train.labels, len(dataset.classes), config.train.class_weights)
        with strategy.scope():
            head = build_head(len(dataset.classes), cache.dim, config.head, config.train.seed)
        marker = {"classes": dataset.classes, "backbone": backbone_info, "runner_version": __version__}

        finetune_latest = run.stage("finetune").latest()
        resumed_from: list[int] = []
        if finetune_latest is not None:  # the head stage finished before fine-tuning began
            head_result, head_record = None, self._head_record(finetune_latest)
        else:
            head_result, resumed_from = self._head_stage(config, strategy, head, train, val, class_weights,
                                                         dict(marker, fingerprint=config.compatibility_fingerprint()))
            if head_result.stopped_by:
                return {"stopped_by": head_result.stopped_by, "global_step": head_result.step, "stage": "head"}
            head_record = read_json(run.head_record)
            if head_result.trained or head_record is None:
                head_only = loss_and_accuracy(predict_logits(head, test.table.all()), test.labels)[1]
                head_record = {"test_accuracy": head_only, "steps": head_result.step, "search": head_result.search}
                write_json(run.head_record, head_record)
        head_steps = head_record["steps"]
        last_eval, stage, global_step, features_of = (head_result.last_eval if head_result else {}), "head", \
            head_steps, None
        if config.fine_tune.enabled:
            features_of = ImageFeatures(backbone, config.cache.batch_size)
            ft_result, history = self._finetune_stage(config, strategy, backbone, head, train, val, class_weights,
                                                      features_of, head_steps,
                                                      _selected_learning_rate(head_record, config.train.learning_rate),
                                                      dict(marker, fingerprint=config.fine_tune_fingerprint()),
                                                      resumed_from)
            resumed_from = history
            if ft_result.stopped_by:
                return {"stopped_by": ft_result.stopped_by, "global_step": head_steps + ft_result.step,
                        "stage": "finetune"}
            last_eval, stage, global_step = ft_result.last_eval, "finetune", head_steps + ft_result.step
        elif finetune_latest is not None:
            raise IncompatibleRunError(f"{run.path} was fine-tuned already; keep fine_tune.enabled = true to "
                                       f"continue it, or use another run.dir for a head-only run.")

        test_features = features_of(test.paths) if features_of else test.table.all()
        report = test_report(predict_logits(head, test_features), test.labels, dataset.classes,
                             [r.relpath for r in test.records])
        summary = {
            "test_accuracy": report["test_accuracy"], "test_loss": report["test_loss"],
            "val_accuracy": last_eval.get("val_accuracy"), "val_loss": last_eval.get("val_loss"),
            "global_step": global_step, "stage": stage, "head_steps": head_steps,
            "finetune_steps": global_step - head_steps,
            "num_classes": len(dataset.classes), "classes": dataset.classes,
            "num_train": len(train.records), "num_val": len(val.records), "num_test": len(test.records),
            "head_only_test_accuracy": head_record["test_accuracy"],
            "backbone": backbone_info, "resumed_from": resumed_from, "skipped_images": dataset.skipped,
            "per_class_accuracy": report["per_class_accuracy"], "runner_version": __version__,
            **(head_record.get("search") or {}),
        }
        if not self._finish(summary, report):
            summary["unchanged"] = True
        return summary

    def _head_stage(self, config: Config, strategy, head, train: Split, val: Split, class_weights,
                    marker: dict):
        head.set_standardization(*feature_statistics(train.table))
        search = self._make_search(config, head, train, val)
        with strategy.scope():
            state = TrainState(tf.Variable(0, dtype=tf.int64, name="global_step"),
                               tf.Variable(config.train.seed, dtype=tf.int64, name="data_seed"))
        if search is None:
            with strategy.scope():
                optimizer = build_optimizer(config.train, head.trainable_variables)
            parts = {"optimizer": optimizer}
        else:
            parts = {"search": search.heads, "search_record": search.record}
        checkpoint = tf.train.Checkpoint(head=head, global_step=state.step, data_seed=state.seed, **parts)
        store = CheckpointStore(self.rundir.stage("head"), checkpoint, config.checkpoint.max_to_keep)
        budget = head_budget(config.train, len(train.records))
        history, restored_eval = self._restore(store, budget.steps, "the head's step budget (train.steps / "
                                               "train.epochs)", search.done if search else lambda: False)
        if not store.stage.steps():  # a new run: no curve of an earlier attempt survives
            self.rundir.metrics.reset()
        self._warn_if_seed_changed(state, config.train.seed)
        base_marker = dict(marker, stage="head", step_offset=0, resumed_from=history)
        order = BatchOrder(len(train.records), config.train.batch_size, int(state.seed.numpy()))
        save = self._checkpoint_callback(store, base_marker)
        prepare = search.standardize if search else (lambda features: features)
        val_features = prepare(val.table.all())

        def next_batch(step: int):
            rows = order.indices(step)
            return prepare(train.table.gather(rows)), train.labels[rows]

        if search is None:
            stage = Stage("head", budget.steps, 0, state,
                          make_head_step(head, optimizer, strategy, config, len(class_weights)), next_batch,
                          lambda step: loss_and_accuracy(predict_logits(head, val_features), val.labels),
                          save, config.eval.every_steps, restored_eval=restored_eval)
        else:
            def save_selected(step: int, metrics: dict) -> None:
                # every checkpoint holds the best head so far, ready to export; the last one the final soup
                if step >= budget.steps or search.done():
                    search.write_selected(head, val_features, val.labels)
                    metrics = dict(metrics, **_val_metrics(head, val))
                else:
                    search.write_selected(head)
                save(step, metrics)

            stage = Stage("head", budget.steps, 0, state, search.train_step, next_batch,
                          lambda step: search.evaluate(step, val_features, val.labels),
                          save_selected, budget.eval_every, search.done, restored_eval)
        result = self._run_stage(stage, strategy, class_weights)
        if search is not None and not result.stopped_by:
            search.log_selection()
            result.search = search.summary()
            result.last_eval = dict(result.last_eval, **_val_metrics(head, val))
        return result, history

    @staticmethod
    def _make_search(config: Config, head, train: Split, val: Split) -> HeadSearch | None:
        """The head search of head.search = auto, or None to train the configured head (also, with a warning,
        when there is no validation split to choose with)."""
        if config.head.search == "off":
            return None
        if len(val.records) == 0:
            log.warning("head.search = auto needs validation images to choose a head, and this run has none "
                        "(split.validation_percent = %g); training the configured head (learning rate %g) "
                        "instead. Raise split.validation_percent to let validation choose.",
                        config.split.validation_percent, config.train.learning_rate)
            return None
        budget = head_budget(config.train, len(train.records))
        return build_search(candidate_grid(len(train.records)), head, config, budget, head.num_classes)

    def _finetune_stage(self, config: Config, strategy, backbone: Backbone, head, train: Split, val: Split,
                        class_weights, features_of: ImageFeatures, head_steps: int, head_learning_rate: float,
                        marker: dict, earlier_history: list[int]):
        ft = config.fine_tune
        unfrozen = unfreeze_top(backbone, ft)
        variables = backbone.model.trainable_variables + head.trainable_variables
        with strategy.scope():
            ft_train = dataclasses.replace(config.train,
                                           learning_rate=ft.learning_rate or head_learning_rate / 10)
            optimizer = build_optimizer(ft_train, variables)
            state = TrainState(tf.Variable(0, dtype=tf.int64, name="finetune_step"),
                               tf.Variable(config.train.seed, dtype=tf.int64, name="data_seed"))
        checkpoint = tf.train.Checkpoint(head=head, backbone=backbone.model, optimizer=optimizer,
                                         global_step=state.step, data_seed=state.seed)
        store = CheckpointStore(self.rundir.stage("finetune"), checkpoint, config.checkpoint.max_to_keep)
        history, restored_eval = self._restore(store, ft.steps, "fine_tune.steps")
        history = history or earlier_history
        self._warn_if_seed_changed(state, config.train.seed)
        log.info("fine-tuning %d backbone layers (BatchNormalization frozen) at learning rate %g",
                 unfrozen, ft_train.learning_rate)
        base_marker = dict(marker, stage="finetune", step_offset=head_steps, resumed_from=history)
        start = int(state.step.numpy())
        order = BatchOrder(len(train.records), ft.batch_size, int(state.seed.numpy()))
        batches = ImageBatches(train.paths, train.labels, order, backbone.image_size, int(state.seed.numpy()),
                               ft, start, max(ft.steps, start))

        def forward(images, seed):
            return head(backbone.model(images, training=False), training=True, dropout_seed=seed)

        step_fn = make_train_step(forward, variables, optimizer, strategy, ft.batch_size, len(class_weights),
                            config.train.label_smoothing)
        stage = Stage("finetune", ft.steps, head_steps, state, step_fn, batches,
                      lambda step: loss_and_accuracy(predict_logits(head, features_of(val.paths)), val.labels),
                      self._checkpoint_callback(store, base_marker), config.eval.every_steps,
                      restored_eval=restored_eval)
        return self._run_stage(stage, strategy, class_weights), history

    def _run_stage(self, stage: Stage, strategy, class_weights):
        return run_stage(self.config, stage, strategy, class_weights, self.rundir.metrics, self.rundir.tensorboard,
                         self.stop)

    def _head_record(self, finetune_latest: CheckpointRef) -> dict:
        """head_stage.json (test accuracy, steps and search of the finished head stage); without it, what the
        fine-tuning checkpoint says."""
        return read_json(self.rundir.head_record) or {
            "test_accuracy": None, "steps": int(finetune_latest.marker["step_offset"]), "search": None}

    @staticmethod
    def _warn_if_seed_changed(state: TrainState, configured: int) -> None:
        used = int(state.seed.numpy())
        if used != configured:
            log.warning("train.seed is %d but this run started with seed %d; keeping %d so the data order "
                        "continues exactly", configured, used, used)


def make_head_step(head, optimizer, strategy, config: Config, num_classes: int):
    """The compiled step of the head stage (head.search = off): cross-entropy plus head.weight_decay L2."""
    decay = config.head.weight_decay
    kernels = [v for v in head.trainable_variables if "kernel" in v.path]

    def l2():
        return 0.5 * decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
    return make_train_step(lambda features, seed: head(features, training=True, dropout_seed=seed),
                           head.trainable_variables, optimizer, strategy, config.train.batch_size, num_classes,
                           config.train.label_smoothing, l2 if decay > 0 else None)


def _val_metrics(head, val: Split) -> dict:
    """The validation loss and accuracy of `head` as it is now."""
    loss, accuracy = loss_and_accuracy(predict_logits(head, val.table.all()), val.labels)
    return {"val_loss": loss, "val_accuracy": accuracy}


def _selected_learning_rate(head_record: dict, configured: float) -> float:
    """The head stage's learning rate: the search's choice, or the configured one."""
    search = head_record.get("search") or {}
    return float(search.get("selected", {}).get("learning_rate", configured))


def _write_if_changed(path: Path, text: str) -> None:
    """Write a record atomically unless it already holds exactly this text."""
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    write_text_atomic(path, text)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
