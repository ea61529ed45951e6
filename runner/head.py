"""The classification head trained on cached vectors, and its RMSProp optimizer."""
from __future__ import annotations

import keras
import tensorflow as tf

from runner.config import HeadConfig, TrainConfig


class Head(keras.Model):
    """Optional ReLU hidden layer, then dropout, then a linear layer giving class logits.

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

    def call(self, features, training=False, dropout_seed=None):
        x = features if self.hidden is None else self.hidden(features)
        if training and self.dropout_rate > 0:
            x = tf.nn.experimental.stateless_dropout(x, rate=self.dropout_rate, seed=dropout_seed)
        return self.logits(x)


def build_head(num_classes: int, feature_dim: int, config: HeadConfig, seed: int) -> Head:
    """A built head with deterministic initial weights."""
    head = Head(num_classes, config.hidden_units, config.dropout, seed=seed, name="head")
    head(tf.zeros((1, feature_dim)))
    return head


def build_optimizer(config: TrainConfig, variables: list) -> keras.optimizers.RMSprop:
    """RMSProp with the configured schedule, its slot variables for `variables` created up front (needed
    for resume and for tf.distribute)."""
    learning_rate = config.learning_rate
    if config.decay_rate < 1.0:
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            config.learning_rate, config.decay_steps, config.decay_rate, staircase=False)
    optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate, rho=config.rho,
                                         momentum=config.momentum, epsilon=config.epsilon)
    optimizer.build(variables)
    return optimizer
