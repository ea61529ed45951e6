"""The head's step loop: batches, RMSProp steps, evaluation, metrics, checkpoint cadence, signals.

Every batch and dropout mask is a pure function of (seed, step); the seed and the step live in the
checkpoint, so a run killed at any step and resumed ends with exactly the weights of an unbroken run.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from runner.config import Config
from runner.distribute import distribute_batch
from runner.errors import RunnerError
from runner.progress import progress
from runner.rundir import MetricsLog

log = logging.getLogger("runner")


class BatchOrder:
    """Which training rows make up step N's batch: an epoch-wise permutation seeded by (seed, epoch)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def _perm(self, epoch: int) -> np.ndarray:
        cached_epoch, permutation = self._cached  # one tuple: safe to read from tf.data threads
        if cached_epoch != epoch:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._cached = (epoch, permutation)
        return permutation

    def indices(self, step: int) -> np.ndarray:
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = positions // self.num_rows, positions % self.num_rows
        return np.array([self._perm(e)[o] for e, o in zip(epochs, offsets)]) if epochs[0] != epochs[-1] \
            else self._perm(int(epochs[0]))[offsets]


def class_weight_vector(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights: ones, or inverse frequency normalised to mean 1 ('balanced')."""
    if mode == "none":
        return np.ones(num_classes, np.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.signal_name is not None


class TrainingDiverged(RunnerError):
    """The training loss became NaN or infinite: nothing from that step on is checkpointed or exported."""

    def __init__(self, stage: str, step: int, loss: float):
        setting = "train.learning_rate" if stage == "head" else "fine_tune.learning_rate"
        super().__init__(f"{stage} training diverged at step {step}: the loss is {loss}. Nothing from this step on "
                         f"was checkpointed or exported (the checkpoints on disk are intact). Lower {setting} and "
                         f"run again (a retry with the same settings diverges the same way); if every candidate "
                         f"of head.search = auto diverged, the cached vectors hold non-finite values: move "
                         f"cache.dir away to extract them again.")


@dataclass
class TrainState:
    """The checkpointed variables besides the head and optimizer."""
    step: tf.Variable
    seed: tf.Variable


@dataclass
class LoopResult:
    """Where a stage ended: its step, the signal that stopped it, its last evaluation, whether it trained."""
    step: int
    stopped_by: str | None
    last_eval: dict = field(default_factory=dict)
    trained: bool = False
    search: dict | None = None      # the head search's `selected` and `candidates`, when it ran


@dataclass
class Stage:
    """One training stage (the head on cached vectors, or fine-tuning on images) for run_stage."""
    name: str                                    # "head" | "finetune": progress, metrics, summary
    total_steps: int
    step_offset: int                             # added to the stage's step in metrics (one x axis)
    state: TrainState
    train_step: Callable                         # compiled (inputs, labels, weights, seed) -> (loss, acc)
    next_batch: Callable[[int], tuple]           # stage step -> (inputs, int32 labels) as numpy
    validate: Callable[[int], tuple]             # stage step -> (val_loss, val_accuracy), None when no val split
    save_checkpoint: Callable[[int, dict], None]
    eval_every: int                              # validate every N stage steps
    done: Callable[[], bool] = lambda: False     # True ends the stage before total_steps (early stopping)
    restored_eval: dict = field(default_factory=dict)  # the evaluation stored with the restored checkpoint

    def finished(self) -> bool:
        """Whether the stage has nothing left to train (its total reached, or stopped early)."""
        return int(self.state.step.numpy()) >= self.total_steps or self.done()


def make_train_step(forward: Callable, variables: list, optimizer, strategy, batch_size: int,
                    num_classes: int, label_smoothing: float, regularization: Callable | None = None):
    """A compiled, distributed step: forward(inputs, seed) → logits; RMSProp on `variables`; an optional
    regularization() loss term (e.g. L2) added once per global batch."""

    def replica_step(inputs, labels, weights, seed):
        with tf.GradientTape() as tape:
            logits = forward(inputs, seed)
            targets = tf.one_hot(labels, num_classes)
            per_example = tf.keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=label_smoothing) * weights
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=batch_size)
            if regularization is not None:
                loss += tf.nn.scale_regularization_loss(regularization())
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels),
                                        tf.float32))
        return loss, correct

    @tf.function
    def train_step(inputs, labels, weights, seed):
        loss, correct = strategy.run(replica_step, args=(inputs, labels, weights, seed))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        correct = strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        return loss, correct / batch_size
    return train_step


def run_stage(config: Config, stage: Stage, strategy, class_weights: np.ndarray, metrics: MetricsLog,
              tensorboard_dir: Path, stop: StopFlag) -> LoopResult:
    """Train a stage from its checkpointed step to its total; checkpoint on cadence, at the end, on a signal.

    A stage already at (or past) its total trains nothing, writes nothing and returns the evaluation
    stored with its checkpoint."""
    step = start = int(stage.state.step.numpy())
    if stage.finished():
        return LoopResult(step, None, dict(stage.restored_eval), trained=False)
    seed = int(stage.state.seed.numpy())
    writer = tf.summary.create_file_writer(str(tensorboard_dir))
    label = "training head" if stage.name == "head" else "fine-tuning"
    bar = progress(stage.total_steps, label, "step", config.train.progress, initial=step)
    last_save_time, last_eval, window = time.monotonic(), {}, []

    def evaluate(step: int) -> dict:
        val_loss, val_accuracy = stage.validate(step)
        recent = np.mean(window, axis=0) if window else (None, None)
        record = {"step": step + stage.step_offset, "stage": stage.name, "stage_step": step,
                  "train_loss": _round(recent[0]), "train_accuracy": _round(recent[1]),
                  "val_loss": _round(val_loss), "val_accuracy": _round(val_accuracy), "time": time.time()}
        metrics.append(record)
        with writer.as_default(step=record["step"]):
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
                if record[key] is not None:
                    tf.summary.scalar(key, record[key])
        window.clear()
        return record

    while step < stage.total_steps and not stop and not stage.done():
        inputs, labels = stage.next_batch(step)
        batch = distribute_batch(strategy, inputs, labels, class_weights[labels])
        loss, accuracy = stage.train_step(*batch, tf.constant([seed, step], tf.int64))
        if not np.isfinite(float(loss)):
            raise TrainingDiverged(stage.name, step + 1, float(loss))
        step += 1
        stage.state.step.assign(step)
        window.append((float(loss), float(accuracy)))
        bar.update()
        if step % stage.eval_every == 0 or step == stage.total_steps:
            last_eval = evaluate(step)
            bar.set_postfix_str(f"loss {last_eval['train_loss']:.3f} acc {last_eval['train_accuracy']:.3f} "
                                f"val_acc {_fmt(last_eval['val_accuracy'])}")
        c = config.checkpoint
        due_by_steps = c.every_steps and step % c.every_steps == 0
        due_by_time = c.every_seconds and time.monotonic() - last_save_time >= c.every_seconds
        if (due_by_steps or due_by_time) and step < stage.total_steps and not stage.done():
            stage.save_checkpoint(step, last_eval)
            last_save_time = time.monotonic()
    bar.close()
    writer.flush()
    finished = step == stage.total_steps or stage.done()
    if finished and (not last_eval or last_eval.get("stage_step") != step):
        last_eval = evaluate(step)
    if step > start:
        stage.save_checkpoint(step, last_eval)
    return LoopResult(step, stop.signal_name, last_eval or dict(stage.restored_eval), trained=step > start)


def _round(value):
    return None if value is None else round(float(value), 6)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
