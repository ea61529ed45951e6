"""The training loop's small event protocol (start, step, evaluation, checkpoint, end) and its listeners.

The loop in runner/train.py only trains and evaluates; everything else it used to do inline listens:
the metrics log, TensorBoard, the progress display, the checkpoint cadence and the sync hand-over.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from runner.progress import progress
from runner.rundir import CheckpointRef, MetricsLog

SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


class Listener:
    """Receives one stage's events; a listener overrides the hooks it needs."""

    def on_start(self, loop) -> None:
        """Training is about to start (not sent when the stage has nothing left to train)."""

    def on_step(self, loop, step: int, loss: float, accuracy: float) -> None:
        """A training step finished (`step` is the stage's step after it)."""

    def on_evaluation(self, loop, record: dict) -> None:
        """A validation finished; `record` is the metrics line."""

    def on_checkpoint(self, loop, checkpoint: CheckpointRef) -> None:
        """A checkpoint is complete on disk."""

    def on_end(self, loop, result) -> None:
        """The stage ended (finished, or stopped by a signal)."""


class MetricsLogger(Listener):
    """Appends every evaluation to metrics.jsonl."""

    def __init__(self, metrics: MetricsLog):
        self.metrics = metrics

    def on_evaluation(self, loop, record: dict) -> None:
        self.metrics.append(record)


class TensorBoardScalars(Listener):
    """Writes every evaluation's numbers as TensorBoard scalars (the writer opens on the first one)."""

    def __init__(self, folder: Path):
        self.folder, self.writer = folder, None

    def on_evaluation(self, loop, record: dict) -> None:
        import tensorflow as tf
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(str(self.folder))
        with self.writer.as_default(step=record["step"]):
            for key in SCALARS:
                if record[key] is not None:
                    tf.summary.scalar(key, record[key])

    def on_end(self, loop, result) -> None:
        if self.writer is not None:
            self.writer.flush()


class ProgressDisplay(Listener):
    """A tqdm bar or plain lines: steps, then loss, accuracy and validation accuracy."""

    def __init__(self, mode: str):
        self.mode, self.bar = mode, None

    def on_start(self, loop) -> None:
        label = "training head" if loop.stage.name == "head" else "fine-tuning"
        self.bar = progress(loop.stage.total_steps, label, "step", self.mode, initial=loop.start)

    def on_step(self, loop, step: int, loss: float, accuracy: float) -> None:
        self.bar.update()

    def on_evaluation(self, loop, record: dict) -> None:
        train_loss, train_accuracy = record["train_loss"], record["train_accuracy"]
        self.bar.set_postfix_str(f"loss {_fmt(train_loss)} acc {_fmt(train_accuracy)} "
                                        f"val_acc {_fmt(record['val_accuracy'])}")

    def on_end(self, loop, result) -> None:
        self.bar.close()


class CheckpointCadence(Listener):
    """Asks the loop for a checkpoint every `every_steps` steps and/or `every_seconds` seconds."""

    def __init__(self, every_steps: int, every_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.every_seconds, self.clock = every_steps, every_seconds, clock
        self.last = clock()

    def on_start(self, loop) -> None:
        self.last = self.clock()

    def on_step(self, loop, step: int, loss: float, accuracy: float) -> None:
        due_by_steps = self.every_steps and step % self.every_steps == 0
        due_by_time = self.every_seconds and self.clock() - self.last >= self.every_seconds
        if (due_by_steps or due_by_time) and not loop.stage.finished():  # the loop saves the last one itself
            loop.checkpoint()

    def on_checkpoint(self, loop, checkpoint: CheckpointRef) -> None:
        self.last = self.clock()


class SyncHandOver(Listener):
    """Gives every finished checkpoint to sync (through the job, which builds the typed hand-over)."""

    def __init__(self, hand_over: Callable[[CheckpointRef], None]):
        self.hand_over = hand_over

    def on_checkpoint(self, loop, checkpoint: CheckpointRef) -> None:
        self.hand_over(checkpoint)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
