"""One training job from start to summary: restore → scan → extract → head → fine-tune → evaluate.

The same call starts a new run or resumes the one in `run.dir`, in whichever stage it stopped.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from common.files import write_text_atomic
from runner import __version__
from runner.backbones import build_backbone
from runner.cache import BottleneckCache
from runner.config import Config, to_toml
from runner.data import Dataset, HashIndex, check_class_sizes, scan_dataset
from runner.distribute import make_strategy
from runner.errors import IncompatibleRunError, RunnerError, StopRequested
from runner.evaluate import loss_and_accuracy, predict_logits, report_json, test_report
from runner.events import CheckpointCadence, MetricsLogger, ProgressDisplay, SyncHandOver, TensorBoardScalars
from runner.export import export_run
from runner.extract import extract_missing
from runner.finetune import ImageFeatures
from runner.head import build_head
from runner.report import write_report
from runner.rundir import CheckpointRef, RunDir, read_json, write_json
from runner.stages import FineTuneStage, HeadStage, Split, TrainingStage
from runner.train import StageLoop, StopFlag, class_weight_vector
from sync import HandOver

log = logging.getLogger("runner")


def check_compatible(marker: dict | None, fingerprint: dict, classes: list[str], run: RunDir,
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
            with self.stop.raising("the snapshot restore"):  # each restored file is renamed into place whole
                restored_step = self.sync.restore_latest()
            if restored_step is not None:
                log.info("downloaded the snapshot of step %d from sync (%s)", restored_step, config.sync.backend)
        self.hash_index = HashIndex(config.cache_dir / "file-hashes.json")
        dataset = scan_dataset(Path(config.data.dir), config.split.validation_percent, config.split.test_percent,
                               self.hash_index, config.data.min_images_per_class, config.train.progress,
                               self.stop)
        sync_folder = config.sync.folder if self.sync.enabled else ""
        for stage, fingerprint in (("head", config.compatibility_fingerprint()),
                                   ("finetune", config.fine_tune_fingerprint())):
            latest = run.stage(stage).latest()
            check_compatible(latest.marker if latest else None, fingerprint, dataset.classes, run, sync_folder)
        _write_if_changed(run.config, to_toml(config))
        _write_if_changed(run.labels, json.dumps(dataset.classes, indent=1))
        return dataset

    def _hand_to_sync(self, checkpoint: CheckpointRef, final: bool = False) -> None:
        """Give sync a finished checkpoint: the complete file list RunDir names for it."""
        files = self.rundir.hand_over(checkpoint, final)
        metrics = {k: v for k, v in checkpoint.marker.get("metrics", {}).items() if k.startswith("val_")}
        self.sync.on_checkpoint(HandOver(
            step=checkpoint.step, files=tuple(files), immutable=frozenset(f for f, fixed in files.items() if fixed),
            runner_version=__version__, metrics=metrics, cache_files=tuple(self._list_cache_files()), final=final,
            published=tuple(self.rundir.published(files)) if final else ()))

    def _finish(self, summary: dict, report: dict) -> bool:
        """Write results, export and plots, then hand sync the final snapshot; False when a finished run
        is started again and nothing changed (then nothing is written, exported or uploaded)."""
        config, run = self.config, self.rundir
        export_info = run.export_info() if config.export.enabled else None
        export_current = not config.export.enabled or (export_info or {}).get("step") == summary["global_step"]
        if read_json(run.summary) == summary and read_json(run.test_report) == report and export_current:
            return False
        write_text_atomic(run.test_report, report_json(report))
        write_json(run.summary, summary)
        if config.export.enabled:
            try:
                export_run(run.path)
            except RunnerError as e:  # e.g. below export.min_accuracy: training itself succeeded
                log.error("no export: %s", e)
        write_report(run.path)
        self._hand_to_sync(run.latest(), final=True)
        return True

    # -- the job -----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train (or continue) both stages and return the summary written to summary.json."""
        try:
            return self._run()
        except StopRequested as e:  # scan, extraction or restore: what they finished is kept for the next start
            return {"stopped_by": e.signal_name, "stopped_in": e.phase}

    def _run(self) -> dict:
        config, run = self.config, self.rundir
        dataset = self._prepare_data()
        strategy = make_strategy(config.train)
        with strategy.scope():
            backbone = build_backbone(config.backbone)
        cache = BottleneckCache(config.cache_dir, backbone.cache_identity, backbone.feature_dim, config.cache.dtype)
        # what sync ships of the cache: its immutable shards and the file-hash index's content-named copy
        self._list_cache_files = lambda: cache.files() + [n for n in [self.hash_index.shipped_name] if n]
        computed = extract_missing(dataset.images, backbone, cache, strategy, config.cache.batch_size,
                                   config.cache.shard_size, config.train.progress, self.stop)
        scanned = len(dataset.skipped)
        dataset = dataset.without(cache.undecodable)
        for item in dataset.skipped[scanned:]:  # the scan already named the files it skipped
            log.warning("skipped %s: %s", item["path"], item["reason"])
        check_class_sizes(dataset, config.data.min_images_per_class)
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
            head_stage = HeadStage(config, strategy, head, train, val, class_weights,
                                   dict(marker, fingerprint=config.compatibility_fingerprint()), run.stage("head"))
            head_result, resumed_from = self._train(head_stage, strategy, class_weights)
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
            ft_stage = FineTuneStage(config, strategy, backbone, head, train, val, class_weights, features_of,
                                     head_steps, _selected_learning_rate(head_record, config.train.learning_rate),
                                     dict(marker, fingerprint=config.fine_tune_fingerprint()), run.stage("finetune"))
            ft_result, history = self._train(ft_stage, strategy, class_weights, resumed_from)
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

    def _train(self, stage: TrainingStage, strategy, class_weights, earlier_history: list[int] = ()):
        """Restore a stage and train it to its end, with the loop's listeners; (result, resume history)."""
        config, run = self.config, self.rundir
        stage.restore(run.metrics, config.train.seed, earlier_history)
        listeners = [MetricsLogger(run.metrics), TensorBoardScalars(run.tensorboard),
                     ProgressDisplay(config.train.progress),
                     CheckpointCadence(config.checkpoint.every_steps, config.checkpoint.every_seconds),
                     SyncHandOver(self._hand_to_sync)]
        loop = StageLoop(stage, listeners, stage.loop_strategy(strategy), class_weights, self.stop)
        return stage.conclude(loop.run()), stage.history

    def _head_record(self, finetune_latest: CheckpointRef) -> dict:
        """head_stage.json (test accuracy, steps and search of the finished head stage); without it, what the
        fine-tuning checkpoint says."""
        return read_json(self.rundir.head_record) or {
            "test_accuracy": None, "steps": int(finetune_latest.marker["step_offset"]), "search": None}


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
