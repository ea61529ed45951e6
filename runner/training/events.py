"""The training loop's declared events (start, step, evaluation, checkpoint, end), its listeners, and the
checkpoint policy the loop consults.

The loop in runner/training/loop.py only trains and evaluates; the metrics log, TensorBoard, the progress display and
the sync hand-over listen. Listeners never call back into the loop: when to checkpoint is a policy the loop
asks after each step (`CheckpointPolicy`), not a listener.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from runner.ui.progress import progress
from runner.run.records import Evaluation
from runner.run.rundir import CheckpointRef, MetricsLog

SCALARS = Evaluation.SCALARS
EVENTS = ("on_start", "on_step", "on_evaluation", "on_checkpoint", "on_end")


class Listener:
    """Receives one stage's events; a subclass overrides the hooks it needs. A method named like a hook that
    is not one of EVENTS is refused when the class is defined, so a misspelt hook cannot silently never fire."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = sorted(name for name in vars(cls) if name.startswith("on_") and name not in EVENTS)
        if unknown:
            raise TypeError(f"{cls.__name__} defines {', '.join(unknown)}, which no event calls; the events "
                            f"are {', '.join(EVENTS)}")

    def on_start(self, loop) -> None:
        """Training is about to start (not sent when the stage has nothing left to train)."""

    def on_step(self, loop, step: int, loss: float, accuracy: float) -> None:
        """A training step finished (`step` is the stage's step after it)."""

    def on_evaluation(self, loop, record: Evaluation) -> None:
        """A validation finished; `record` is the metrics line."""

    def on_checkpoint(self, loop, checkpoint: CheckpointRef) -> None:
        """A checkpoint is complete on disk."""

    def on_end(self, loop, result) -> None:
        """The stage ended (finished, or stopped by a signal)."""


class Listeners(Listener):
    """Several listeners as one: each event is told to every one of them, in order."""

    def __init__(self, listeners: list[Listener]):
        for listener in listeners:
            if not isinstance(listener, Listener):
                raise TypeError(f"{type(listener).__name__} is not a runner.training.events.Listener")
        self.listeners = list(listeners)

    def on_start(self, loop) -> None:
        for listener in self.listeners:
            listener.on_start(loop)

    def on_step(self, loop, step: int, loss: float, accuracy: float) -> None:
        for listener in self.listeners:
            listener.on_step(loop, step, loss, accuracy)

    def on_evaluation(self, loop, record: Evaluation) -> None:
        for listener in self.listeners:
            listener.on_evaluation(loop, record)

    def on_checkpoint(self, loop, checkpoint: CheckpointRef) -> None:
        for listener in self.listeners:
            listener.on_checkpoint(loop, checkpoint)

    def on_end(self, loop, result) -> None:
        for listener in self.listeners:
            listener.on_end(loop, result)


class CheckpointPolicy:
    """When the loop checkpoints before a stage's end: every `every_steps` steps and/or every `every_seconds`
    seconds (0 turns either off). The loop always checkpoints at the end and on a signal as well."""

    def __init__(self, every_steps: int, every_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.every_seconds, self.clock = every_steps, every_seconds, clock
        self.last = clock()

    def start(self) -> None:
        """Training starts now: the time cadence counts from here."""
        self.last = self.clock()

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after `step`."""
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        return by_steps or bool(self.every_seconds) and self.clock() - self.last >= self.every_seconds

    def saved(self) -> None:
        """A checkpoint was just written."""
        self.last = self.clock()


class MetricsLogger(Listener):
    """Appends every evaluation to metrics.jsonl."""

    def __init__(self, metrics: MetricsLog):
        self.metrics = metrics

    def on_evaluation(self, loop, record: Evaluation) -> None:
        self.metrics.append(record.to_json())


class TensorBoardScalars(Listener):
    """Writes every evaluation's numbers as TensorBoard scalars (the writer opens on the first one)."""

    def __init__(self, folder: Path):
        self.folder, self.writer = folder, None

    def on_evaluation(self, loop, record: Evaluation) -> None:
        import tensorflow as tf
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(str(self.folder))
        with self.writer.as_default(step=record.step):
            for key in SCALARS:
                if getattr(record, key) is not None:
                    tf.summary.scalar(key, getattr(record, key))

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

    def on_evaluation(self, loop, record: Evaluation) -> None:
        self.bar.set_postfix_str(f"loss {_fmt(record.train_loss)} acc {_fmt(record.train_accuracy)} "
                                 f"val_acc {_fmt(record.val_accuracy)}")

    def on_end(self, loop, result) -> None:
        self.bar.close()


class SyncHandOver(Listener):
    """Gives every finished checkpoint to sync (through the job, which builds the typed hand-over)."""

    def __init__(self, hand_over: Callable[[CheckpointRef], None]):
        self.hand_over = hand_over

    def on_checkpoint(self, loop, checkpoint: CheckpointRef) -> None:
        self.hand_over(checkpoint)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
