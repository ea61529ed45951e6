"""The head's step loop: batches, RMSProp steps, evaluation, metrics, checkpoint cadence, signals.

Every batch and dropout mask is a pure function of (seed, step); the seed and the step live in the
checkpoint, so a run killed at any step and resumed ends with exactly the weights of an unbroken run.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from runner.cache import FeatureTable
from runner.config import Config
from runner.distribute import distribute_batch
from runner.evaluate import loss_and_accuracy, predict_logits
from runner.progress import progress

log = logging.getLogger("runner")


class BatchOrder:
    """Which training rows make up step N's batch: an epoch-wise permutation seeded by (seed, epoch)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self._epoch, self._permutation = -1, None

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._permutation

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


@dataclass
class TrainState:
    """The checkpointed variables besides the head and optimizer."""
    step: tf.Variable
    seed: tf.Variable


@dataclass
class LoopResult:
    step: int
    stopped_by: str | None
    last_eval: dict = field(default_factory=dict)


def make_train_step(head, optimizer, strategy, config: Config, num_classes: int):
    """A compiled, distributed training step returning (mean loss, accuracy) of the batch."""
    smoothing = config.train.label_smoothing
    batch_size = config.train.batch_size

    def replica_step(features, labels, weights, seed):
        with tf.GradientTape() as tape:
            logits = head(features, training=True, dropout_seed=seed)
            targets = tf.one_hot(labels, num_classes)
            per_example = tf.keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=smoothing) * weights
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=batch_size)
        gradients = tape.gradient(loss, head.trainable_variables)
        optimizer.apply_gradients(zip(gradients, head.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels),
                                        tf.float32))
        return loss, correct

    @tf.function
    def train_step(features, labels, weights, seed):
        loss, correct = strategy.run(replica_step, args=(features, labels, weights, seed))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        correct = strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        return loss, correct / batch_size
    return train_step


def run_loop(config: Config, head, optimizer, strategy, state: TrainState, train_table: FeatureTable,
             train_labels: np.ndarray, val_features: np.ndarray, val_labels: np.ndarray,
             save_checkpoint: Callable[[int, dict], None], metrics_path: Path, stop: StopFlag) -> LoopResult:
    """Train from state.step to config.train.steps; checkpoint on cadence, at the end and on a signal."""
    t = config.train
    num_classes = head.num_classes
    seed = int(state.seed.numpy())
    order = BatchOrder(len(train_table), t.batch_size, seed)
    class_weights = class_weight_vector(train_labels, num_classes, t.class_weights)
    train_step = make_train_step(head, optimizer, strategy, config, num_classes)
    writer = tf.summary.create_file_writer(str(Path(config.run.dir) / "tensorboard"))
    step = int(state.step.numpy())
    bar = progress(t.steps, "training head", "step", t.progress, initial=step)
    last_save_time, last_eval, window = time.monotonic(), {}, []

    def evaluate(step: int) -> dict:
        val_loss, val_accuracy = loss_and_accuracy(predict_logits(head, val_features), val_labels)
        recent = np.mean(window, axis=0) if window else (None, None)
        record = {"step": step, "train_loss": _round(recent[0]), "train_accuracy": _round(recent[1]),
                  "val_loss": _round(val_loss), "val_accuracy": _round(val_accuracy), "time": time.time()}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        with writer.as_default(step=step):
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
                if record[key] is not None:
                    tf.summary.scalar(key, record[key])
        window.clear()
        return record

    while step < t.steps and not stop:
        rows = order.indices(step)
        labels = train_labels[rows]
        batch = distribute_batch(strategy, train_table.gather(rows), labels.astype(np.int32),
                                 class_weights[labels])
        loss, accuracy = train_step(*batch, tf.constant([seed, step], tf.int64))
        step += 1
        state.step.assign(step)
        window.append((float(loss), float(accuracy)))
        bar.update()
        if step % config.eval.every_steps == 0 or step == t.steps:
            last_eval = evaluate(step)
            bar.set_postfix_str(f"loss {last_eval['train_loss']:.3f} acc {last_eval['train_accuracy']:.3f} "
                                f"val_acc {_fmt(last_eval['val_accuracy'])}")
        c = config.checkpoint
        due_by_steps = c.every_steps and step % c.every_steps == 0
        due_by_time = c.every_seconds and time.monotonic() - last_save_time >= c.every_seconds
        if (due_by_steps or due_by_time) and step < t.steps:
            save_checkpoint(step, last_eval)
            last_save_time = time.monotonic()
    bar.close()
    writer.flush()
    if step == t.steps and (not last_eval or last_eval.get("step") != step):
        last_eval = evaluate(step)
    save_checkpoint(step, last_eval)
    return LoopResult(step, stop.signal_name, last_eval)


def _round(value):
    return None if value is None else round(float(value), 6)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
