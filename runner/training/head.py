"""The classification head trained on cached vectors, and its RMSProp optimizer."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from runner.run.config import FineTuneConfig, HeadConfig, TrainConfig


class Head(keras.Model):
    """Standardization, an optional ReLU hidden layer, then dropout, then a linear layer giving class logits.

    The per-dimension mean and std of the training split's vectors are non-trainable weights of the head,
    so they are in every checkpoint and folded into every export (the exported graph still takes bytes).

    Dropout is stateless (seeded by the caller with the training step), so training is an exact
    function of the checkpointed weights and the step: nothing hidden needs saving for exact resume.
    """

    def __init__(self, num_classes: int, hidden_units: int = 0, dropout: float = 0.0, seed: int = 0, **kw):
        super().__init__(**kw)
        self.num_classes, self.hidden_units, self.dropout_rate = num_classes, hidden_units, dropout
        init = keras.initializers.GlorotUniform(seed=seed)
        self.hidden = keras.layers.Dense(hidden_units, activation="relu", kernel_initializer=init,
                                         name="hidden") if hidden_units else None
        self.logits = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.GlorotUniform(
            seed=seed + 1), name="logits")

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.feature_mean = self.add_weight(shape=(dim,), initializer="zeros", trainable=False,
                                            name="feature_mean")
        self.feature_std = self.add_weight(shape=(dim,), initializer="ones", trainable=False, name="feature_std")
        super().build(input_shape)

    def set_standardization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Use the training split's per-dimension mean and std (std 0 is taken as 1)."""
        self.feature_mean.assign(np.asarray(mean, np.float32))
        self.feature_std.assign(np.where(np.asarray(std) > 1e-6, std, 1.0).astype(np.float32))

    def call(self, features, training=False, dropout_seed=None):
        x = (features - self.feature_mean) / self.feature_std
        x = x if self.hidden is None else self.hidden(x)
        if training and self.dropout_rate > 0:
            x = tf.nn.experimental.stateless_dropout(x, rate=self.dropout_rate, seed=dropout_seed)
        return self.logits(x)


def build_head(num_classes: int, feature_dim: int, config: HeadConfig, seed: int) -> Head:
    """A built head with deterministic initial weights."""
    head = Head(num_classes, config.hidden_units, config.dropout, seed=seed, name="head")
    head(tf.zeros((1, feature_dim)))
    return head


def feature_statistics(table, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of a FeatureTable's vectors (float64 sums, read in batches)."""
    total, squares, n = np.zeros(table.dim), np.zeros(table.dim), len(table)
    for lo in range(0, n, batch):
        block = table.gather(np.arange(lo, min(lo + batch, n))).astype(np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / max(n, 1)
    return mean, np.sqrt(np.maximum(squares / max(n, 1) - np.square(mean), 0.0))


def build_optimizer(config: TrainConfig | FineTuneConfig, variables: list, learning_rate: float | None = None
                    ) -> keras.optimizers.RMSprop:
    """RMSProp with the schedule of a stage's section (train for the head, fine_tune for fine-tuning; at
    `learning_rate` instead of the section's when given), its slot variables for `variables` created up front
    (needed for resume and for tf.distribute)."""
    base = config.learning_rate if learning_rate is None else learning_rate
    learning_rate = base
    if config.decay_rate < 1.0:
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            base, config.decay_steps, config.decay_rate, staircase=False)
    optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate, rho=config.rho,
                                         momentum=config.momentum, epsilon=config.epsilon)
    optimizer.build(variables)
    return optimizer
