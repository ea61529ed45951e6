"""One training job from start to summary: prepare → head → fine-tune → evaluate → finish.

The same call starts a new run or resumes the one in `run.dir`, in whichever stage it stopped. `Job.run`
is a few small build steps (Model Garden's `_build_*` style) and returns a typed outcome (runner/run/results.py)
that resume.py reads: Finished, Unchanged or Stopped.
"""
from __future__ import annotations

import logging

from runner import __version__
from runner.features.backbones import build_backbone
from runner.run.config import Config, ignored_settings
from runner.features.distribute import extraction_batch_size, make_strategy
from runner.errors import IncompatibleRunError, RunnerError, StopRequested
from runner.training.evaluate import loss_and_accuracy, predict_logits, test_report
from runner.training.events import (CheckpointPolicy, Listeners, MetricsLogger, ProgressDisplay, SyncHandOver,
                           TensorBoardScalars)
from runner.export.exporter import export_run
from runner.training.finetune import ImageFeatures
from runner.training.head import build_head
from runner.prepare import Prepared, prepare
from runner.ui.report import write_report
from runner.run.records import RunSteps, TestReport
from runner.run.results import Finished, HeadRecord, Outcome, StageResult, Stopped, Summary, Unchanged
from runner.run.rundir import CheckpointRef, RunDir
from runner.training.stages import FineTuneStage, TrainingStage, build_head_stage
from runner.export.tflite import BackgroundConversion, converts_in_background, start_background_conversion
from runner.training.loop import StageLoop, StopFlag, class_weight_vector
from sync import HandOver

log = logging.getLogger("runner")


class Job:
    """Wires config, data, cache, stages, checkpoints and sync for one run directory."""

    def __init__(self, config: Config, sync, stop: StopFlag | None = None, make_backbone=build_backbone):
        self.config, self.sync = config, sync
        self.rundir = RunDir(config.run_dir)
        self.stop = stop if stop is not None else StopFlag()
        self.make_backbone = make_backbone  # tests pass a small one
        self.prepared: Prepared | None = None
        self.conversion: BackgroundConversion | None = None

    def run(self) -> Outcome:
        """Train (or continue) both stages, evaluate, export and hand sync the final snapshot."""
        for warning in ignored_settings(self.config):
            log.warning("%s", warning)
        try:
            strategy = make_strategy(self.config.train)
            data = self.prepared = prepare(self.config, self.rundir, self.sync, self.stop, strategy,
                                           self.make_backbone, self._start_tflite_conversion)
            class_weights = class_weight_vector(data.train.labels, len(data.dataset.classes),
                                                self.config.train.class_weights)
            with strategy.scope():
                head = build_head(len(data.dataset.classes), data.cache.dim, self.config.head, self.config.train.seed)
            head_result, head_record, history = self._build_head_stage(data, strategy, head, class_weights)
            head_steps = data.version.steps
            if head_result is not None and head_result.stopped_by:
                return Stopped(head_result.stopped_by, "head training", head_steps.run_wide(head_result.step))
            features_of, last = None, head_result
            if self.config.fine_tune.enabled:
                features_of = ImageFeatures(data.backbone, extraction_batch_size(self.config.cache.batch_size))
                last, history = self._build_fine_tune_stage(data, strategy, head, class_weights, features_of,
                                                            head_record, history)
                if last.stopped_by:
                    return Stopped(last.stopped_by, "fine-tuning", finetune_steps(data, head_record).run_wide(last.step))
            elif self.rundir.stage("finetune").latest() is not None:
                raise IncompatibleRunError(f"{self.rundir.path} was fine-tuned already; keep fine_tune.enabled = "
                                           f"true to continue it, or use another run.dir for a head-only run.")
            summary, report = self._evaluate(data, head, head_record, last, history, features_of)
            return Finished(summary) if self._finish(summary, report) else Unchanged(summary)
        except StopRequested as e:  # scan, extraction or restore: what they finished is kept for the next start
            return Stopped(e.signal_name, e.phase)
        finally:
            if self.conversion is not None:
                self.conversion.close()

    # -- build steps -------------------------------------------------------------------------------------
    def _build_head_stage(self, data: Prepared, strategy, head, class_weights
                          ) -> tuple[StageResult | None, HeadRecord, list[int]]:
        """Train the head stage to its end (result None when fine-tuning had already begun); its record."""
        run = self.rundir
        finetune_latest = run.stage("finetune").latest()
        if finetune_latest is not None:  # the head stage finished before fine-tuning began
            return None, self._head_record(finetune_latest, data.version.steps), []
        marker = data.marker(self.config.compatibility_fingerprint())
        stage = build_head_stage(self.config, strategy, head, data.train, data.val, class_weights, marker,
                                 run.stage("head"), data.version.steps.offset)
        result, history = self._train(stage, strategy, class_weights)
        record = run.read_head_record()
        if not result.stopped_by and (result.trained or record is None):
            head_only = loss_and_accuracy(predict_logits(head, data.test.table.all()), data.test.labels)[1]
            record = HeadRecord(head_only, result.step, result.search)
            run.write_head_record(record)
        return result, record, history

    def _build_fine_tune_stage(self, data: Prepared, strategy, head, class_weights, features_of: ImageFeatures,
                               head_record: HeadRecord, history: list[int]) -> tuple[StageResult, list[int]]:
        """Fine-tune from the head stage's head, at fine_tune.learning_rate (or a tenth of the head's)."""
        search = head_record.search
        head_rate = search.selected_candidate.learning_rate if search else self.config.train.learning_rate
        marker = data.marker(self.config.fine_tune_fingerprint())
        stage = FineTuneStage(self.config, strategy, data.backbone, head, data.train, data.val, class_weights,
                              features_of, finetune_steps(data, head_record).offset, head_rate, marker,
                              self.rundir.stage("finetune"))
        return self._train(stage, strategy, class_weights, history)

    def _train(self, stage: TrainingStage, strategy, class_weights, earlier_history: list[int] = ()
               ) -> tuple[StageResult, list[int]]:
        """Restore a stage and train it to its end with the loop's listeners; (result, resume history)."""
        config, run = self.config, self.rundir
        stage.restore(run.metrics, config.train.seed, earlier_history)
        listeners = Listeners([MetricsLogger(run.metrics), TensorBoardScalars(run.tensorboard),
                               ProgressDisplay(config.train.progress), SyncHandOver(self._hand_to_sync)])
        policy = CheckpointPolicy(config.checkpoint.every_steps, config.checkpoint.every_seconds)
        loop = StageLoop(stage, listeners, stage.loop_strategy(strategy), class_weights, self.stop, policy)
        return stage.conclude(loop.run()), stage.history

    def _evaluate(self, data: Prepared, head, head_record: HeadRecord, last: StageResult | None,
                  history: list[int], features_of: ImageFeatures | None) -> tuple[Summary, TestReport]:
        """The test report and the run's summary (the model as the last stage left it)."""
        test = data.test
        report = test_report(predict_logits(head, features_of(test.paths) if features_of else test.table.all()),
                             test.labels, data.dataset.classes, [r.relpath for r in test.records])
        last_eval = last.last_eval if last else None
        fine_tuned = last.step if last is not None and last.stage == "finetune" else 0
        summary = Summary(
            test_accuracy=report.accuracy, test_loss=report.loss,
            val_accuracy=last_eval.val_accuracy if last_eval else None,
            val_loss=last_eval.val_loss if last_eval else None,
            global_step=finetune_steps(data, head_record).run_wide(fine_tuned),
            stage="finetune" if self.config.fine_tune.enabled else "head",
            head_steps=head_record.steps, finetune_steps=fine_tuned, classes=data.dataset.classes,
            num_train=len(data.train.records), num_val=len(data.val.records), num_test=len(test.records),
            head_only_test_accuracy=head_record.test_accuracy, backbone=data.backbone_info().to_json(),
            resumed_from=history, skipped_images=data.dataset.skipped,
            per_class_accuracy=dict(report.per_class_accuracy), runner_version=__version__,
            data_version=data.version.number, data_layout=data.dataset.layout_json(), search=head_record.search)
        return summary, report

    def _finish(self, summary: Summary, report: TestReport) -> bool:
        """Write results, export and report, then hand sync the final snapshot; False when a finished run is
        started again and nothing changed (then nothing is written or exported; a final snapshot that never
        reached the remote is handed over again).

        Each piece is checked against this step, so a start after a kill anywhere in here redoes only what is
        missing; the run counts as finished only once the report is complete, and the final snapshot is
        staged before this returns."""
        config, run, step = self.config, self.rundir, summary.global_step
        results_current = run.read_summary() == summary and run.read_test_report() == report
        export_current = not config.export.enabled or (run.export_info() or {}).get("step") == step
        report_current = run.report_step() == step
        if results_current and export_current and report_current:
            self._send_final_if_missing(step)
            return False
        if not results_current:
            run.write_test_report(report)
            run.write_summary(summary)
        if config.export.enabled and not (results_current and export_current):
            try:
                export_run(run.path)
            except RunnerError as e:  # e.g. below export.min_accuracy: training itself succeeded
                log.error("no export: %s", e)
        write_report(run.path)
        self._hand_to_sync(run.latest(), final=True)
        return True

    def _send_final_if_missing(self, step: int) -> None:
        """A finished run started again: when sync holds no final snapshot of `step` (neither on the remote nor
        queued here: a kill came between the results and the hand-over, or sync was off then), hand it over."""
        if self.sync.enabled and not self.sync.holds_final(step):
            log.warning("the final snapshot of step %d is not on the remote; sending it now", step)
            self._hand_to_sync(self.rundir.latest(), final=True)

    # -- helpers -----------------------------------------------------------------------------------------
    def _start_tflite_conversion(self, backbone) -> None:
        """Convert the export's TFLite backbone in a child process while extraction and training go on, when it
        is big enough to be worth one (the backbone's weights are on disk by now: the child never downloads
        them a second time)."""
        if converts_in_background(backbone):
            self.conversion = start_background_conversion(self.config)

    def _hand_to_sync(self, checkpoint: CheckpointRef, final: bool = False) -> None:
        """Give sync a finished checkpoint: the complete file list RunDir names for it."""
        files = self.rundir.hand_over(checkpoint, final)
        evaluation = checkpoint.marker.evaluation
        metrics = evaluation.validation() if evaluation else {}
        cache_files = self.prepared.cache_files() if self.prepared else []
        self.sync.on_checkpoint(HandOver(
            step=checkpoint.step, files=tuple(files), immutable=frozenset(f for f, fixed in files.items() if fixed),
            runner_version=__version__, metrics=metrics, cache_files=tuple(cache_files), final=final,
            published=tuple(self.rundir.published(files)) if final else ()))

    def _head_record(self, finetune_latest: CheckpointRef, version_steps: RunSteps) -> HeadRecord:
        """head_stage.json; without it, what the fine-tuning checkpoint says (the head stage's steps)."""
        return self.rundir.read_head_record() or HeadRecord(
            None, version_steps.stage_local(finetune_latest.marker.steps.offset), None)


def finetune_steps(data: Prepared, head_record: HeadRecord) -> RunSteps:
    """Where fine-tuning's steps sit in the run: after the data version's start and the head stage's steps."""
    return RunSteps(data.version.steps.run_wide(head_record.steps))
