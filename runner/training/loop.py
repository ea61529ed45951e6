"""The step loop of a training stage: batches, steps, evaluation, signals; the rest listens to its events.

The loop trains and validates a stage (runner/training/stages.py), checkpoints when its CheckpointPolicy says so, and
emits the five declared events (start, step, evaluation, checkpoint, end) to its listeners: the metrics log,
TensorBoard, the progress display and the sync hand-over (runner/training/events.py). Every batch and dropout mask is a pure function of
(seed, step); the seed and the step live in the checkpoint, so a run killed at any step and resumed ends
with exactly the weights of an unbroken run.
"""
from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf

from runner.features.distribute import distribute_batch
from runner.errors import RunnerError, StopRequested
from runner.training.events import CheckpointPolicy, Listener
from runner.run.records import Evaluation
from runner.run.results import StageResult

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
        self._raise_in: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self._raise_in is not None:
            raise StopRequested(self.signal_name, self._raise_in)

    @contextmanager
    def raising(self, phase: str):
        """Within the block a signal raises StopRequested at once (for code that does not poll the flag)."""
        if self:
            raise StopRequested(self.signal_name, phase)
        self._raise_in = phase
        try:
            yield
        finally:
            self._raise_in = None

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


class StageLoop:
    """Trains one stage from its checkpointed step to its end: evaluates on the stage's cadence, checkpoints when
    the policy says so, at the end and on a signal, and tells the listeners each event. A stage with nothing left
    to train emits nothing and returns the evaluation stored with its checkpoint."""

    def __init__(self, stage, listeners: Listener, strategy, class_weights: np.ndarray, stop: StopFlag,
                 policy: CheckpointPolicy):
        self.stage, self.listeners, self.strategy, self.policy = stage, listeners, strategy, policy
        self.class_weights, self.stop = class_weights, stop
        self.start = self.step = stage.step
        self.last_eval: Evaluation | None = None
        self._window: list[tuple[float, float]] = []

    def checkpoint(self) -> None:
        """Save the stage at the current step and tell the listeners."""
        checkpoint = self.stage.save(self.step, self.last_eval)
        self.policy.saved()
        log.info("checkpoint saved at %s step %d", checkpoint.stage, checkpoint.local_step)
        self.listeners.on_checkpoint(self, checkpoint)

    def _evaluate(self) -> None:
        stage = self.stage
        val_loss, val_accuracy = stage.validate(self.step)
        recent = np.mean(self._window, axis=0) if self._window else (None, None)
        self.last_eval = Evaluation(step=self.step + stage.step_offset, stage=stage.name, stage_step=self.step,
                                    train_loss=_round(recent[0]), train_accuracy=_round(recent[1]),
                                    val_loss=_round(val_loss), val_accuracy=_round(val_accuracy), time=time.time())
        self._window.clear()
        self.listeners.on_evaluation(self, self.last_eval)

    def run(self) -> StageResult:
        """Train until the stage's total, its early stop or a signal; checkpoint at the end."""
        stage = self.stage
        if stage.finished():
            return StageResult(stage.name, self.step, None, stage.restored_eval, trained=False)
        seed = int(stage.state.seed.numpy())
        self.policy.start()
        self.listeners.on_start(self)
        while self.step < stage.total_steps and not self.stop and not stage.done():
            inputs, labels = stage.next_batch(self.step)
            batch = distribute_batch(self.strategy, inputs, labels, self.class_weights[labels])
            loss, accuracy = (float(x) for x in stage.train_step(*batch, tf.constant([seed, self.step], tf.int64)))
            if not np.isfinite(loss):
                raise TrainingDiverged(stage.name, self.step + 1, loss)
            self.step += 1
            stage.state.step.assign(self.step)
            self._window.append((loss, accuracy))
            if self.step % stage.eval_every == 0 or self.step == stage.total_steps:
                self._evaluate()
            self.listeners.on_step(self, self.step, loss, accuracy)
            if self.policy.due(self.step) and not stage.finished():  # the last one is saved below
                self.checkpoint()
        if stage.finished() and (self.last_eval is None or self.last_eval.stage_step != self.step):
            self._evaluate()
        if self.step > self.start:
            self.checkpoint()
        result = StageResult(stage.name, self.step, self.stop.signal_name,
                             self.last_eval or stage.restored_eval, trained=self.step > self.start)
        self.listeners.on_end(self, result)
        return result


def _round(value):
    return None if value is None else round(float(value), 6)
