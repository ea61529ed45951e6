"""Automatic head selection: a grid of candidate heads trained at once, chosen on the validation split.

All candidates share one stacked set of variables (K heads side by side), one batch per step and one
compiled step, so K candidates cost far less than K runs. Each has its own RMSProp learning rate and L2
weight decay. Every evaluation (once per epoch) records, per candidate, the best validation step and a
copy of its weights at that step; a candidate whose validation loss stalls has its learning rate halved,
and one that stalls for `train.patience` evaluations stops. Successive halving drops the weaker
candidates at a few rungs so the cost stays close to that of a single head on large data. The result is
the best step of the best candidate, written into an ordinary `Head`.

Everything lives in tf.Variables, so the search checkpoints and resumes exactly like a single head.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from runner.run.results import CandidateRecord, SearchSummary

if TYPE_CHECKING:
    from runner.run.config import Config, TrainConfig

log = logging.getLogger("runner")

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)   # RMSProp, on standardized features: a 100x span
INVERSE_C = (0.0, 1.0, 10.0, 100.0)               # L2 weight decay = INVERSE_C / N_train (as 1/C in LR)
RUNG_KEEP = 1 / 3                                 # successive halving keeps the best third at each rung
RUNG_GROWTH = 3                                   # rungs at r, 3r, 9r steps
MIN_RUNG_STEPS = 3000                             # no pruning before this many steps (tiny data is cheap)


MIN_STEPS = 1000                                  # a tiny training split still gets this many steps
MIN_EVAL_STEPS = 10                               # and is not validated more often than this


@dataclass(frozen=True)
class HeadBudget:
    """How long the head stage trains and how often it validates, sized by passes over the training split."""
    steps: int
    eval_every: int


def head_budget(train: "TrainConfig", num_train: int) -> HeadBudget:
    """train.steps if set, else train.epochs epochs (at least MIN_STEPS); validation once per epoch."""
    steps_per_epoch = max(1, math.ceil(num_train / train.batch_size))
    steps = train.steps or max(MIN_STEPS, math.ceil(train.epochs * steps_per_epoch))
    return HeadBudget(steps, max(steps_per_epoch, MIN_EVAL_STEPS))


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: an RMSProp learning rate and an L2 weight decay."""
    learning_rate: float
    weight_decay: float


def candidate_grid(num_train: int) -> list[Candidate]:
    """The default grid: every learning rate with every weight decay (scaled by the training-set size)."""
    return [Candidate(lr, c / max(num_train, 1)) for lr in LEARNING_RATES for c in INVERSE_C]


XLA_MIN_PARAMETERS = 100_000  # per candidate; below it XLA's gain is within noise and each recompile costs more


def xla_pays_off(dim: int, num_classes: int, hidden_units: int, dropout: float) -> bool:
    """Whether the search's training step is compiled by XLA (a rule of the shapes, so a resumed run makes the
    same choice and ends bit-identical).

    Measured per step on 2 CPU cores, 20 candidates, batch 100 (plain TensorFlow → XLA): 1,280 x 1,000 linear
    197 → 90 ms, 2,048 x 100 linear 47 → 15 ms; but 256 x 10 linear 2.3 → 2.0 ms, and every compaction (a
    candidate stops) recompiles for 0.3-0.7 s; with dropout XLA's stateless random ops make the step slower
    (256 → 128 → 10: 8.6 → 84 ms; 1,280 → 128 → 1,000: 59 → 116 ms). So: XLA for large heads without dropout."""
    parameters = dim * hidden_units + hidden_units * num_classes if hidden_units else dim * num_classes
    return dropout == 0 and parameters >= XLA_MIN_PARAMETERS


class StackedHeads(tf.Module):
    """The candidates still training, side by side as one set of variables, plus every candidate's best step.

    Training variables hold one slot per training candidate (`slots` maps slot → candidate) and shrink
    when a candidate stops or is pruned (`compact`), so each step costs as many candidates as still train.
    The first kernel is laid out [dim, slot, units]: all slots' first layer is one matrix product with the
    shared batch. Each candidate has its own RMSProp learning rate and L2 weight decay; `best_weights`
    (candidate-major) hold each candidate's weights at its best validation step.
    """

    def __init__(self, candidates: list[Candidate], dim: int, num_classes: int, hidden_units: int,
                 dropout: float, seed: int, rho: float, momentum: float, epsilon: float):
        super().__init__(name="search")
        k = len(candidates)
        self.num_candidates, self.hidden_units, self.dropout = k, hidden_units, dropout
        self.rho, self.momentum, self.epsilon = rho, momentum, epsilon
        shapes = ([(dim, hidden_units), (hidden_units,), (hidden_units, num_classes), (num_classes,)]
                  if hidden_units else [(dim, num_classes), (num_classes,)])
        best = []  # candidate-major initial values: Glorot uniform kernels (as keras.layers.Dense), zero biases
        for i, shape in enumerate(shapes):
            limit = math.sqrt(6 / sum(shape))
            best.append(tf.random.stateless_uniform((k, *shape), [seed, i], -limit, limit) if len(shape) == 2
                        else tf.zeros((k, *shape)))
        self.best_weights = [tf.Variable(v, name=f"best{i}") for i, v in enumerate(best)]
        training = [self._to_slots(i, v) for i, v in enumerate(best)]
        self.weights = [self._slot_variable(v, i, f"w{i}") for i, v in enumerate(training)]
        self.velocities = [self._slot_variable(tf.zeros_like(v), i, f"v{i}") for i, v in enumerate(training)]
        self.moments = [self._slot_variable(tf.zeros_like(v), i, f"m{i}") for i, v in enumerate(training)] \
            if momentum > 0 else []
        self.slots = tf.Variable(tf.range(k), shape=tf.TensorShape([None]), name="slots")
        self.learning_rates = tf.Variable([c.learning_rate for c in candidates], dtype=tf.float32,
                                          name="learning_rates")          # per candidate, halved on plateaus
        self.weight_decays = tf.constant([c.weight_decay for c in candidates], tf.float32)
        # autograph off: every branch and loop in these functions is on Python values, so the graph is the same
        # without it and no process pays for converting them
        self._plain_step = tf.function(self._train_step, autograph=False)
        self.uses_xla = xla_pays_off(dim, num_classes, hidden_units, dropout)
        self._step_fn = tf.function(self._train_step, jit_compile=True, autograph=False) if self.uses_xla \
            else self._plain_step
        self._step_checked = not self.uses_xla
        self._logits_fn = tf.function(lambda features: self.logits(self.weights, features), autograph=False)

    @staticmethod
    def _slot_axis(i: int) -> int:
        return 1 if i == 0 else 0  # the first kernel is [dim, slot, units]; the others are slot-major

    def _to_slots(self, i: int, candidate_major):
        return tf.transpose(candidate_major, [1, 0, 2]) if i == 0 else candidate_major

    def _slot_variable(self, value, i: int, name: str) -> tf.Variable:
        shape = value.shape.as_list()
        shape[self._slot_axis(i)] = None
        return tf.Variable(value, shape=tf.TensorShape(shape), name=name)

    def logits(self, weights: list, features, training: bool = False, seed=None):
        """Logits [batch, slot, classes] of slot-laid-out weights on shared features [batch, dim].

        As in Head: optional ReLU hidden layer, then dropout (training only), then the logits layer."""
        first = weights[0]
        x = features
        if training and self.dropout > 0 and len(weights) == 2:
            x = tf.nn.experimental.stateless_dropout(x, rate=self.dropout, seed=seed)
        units = tf.shape(first)[2]
        x = tf.reshape(tf.matmul(x, tf.reshape(first, [tf.shape(first)[0], -1])),
                       [tf.shape(x)[0], -1, units]) + weights[1][None]
        if len(weights) == 4:
            x = tf.nn.relu(x)
            if training and self.dropout > 0:
                x = tf.nn.experimental.stateless_dropout(x, rate=self.dropout, seed=seed)
            x = tf.einsum("bkh,khc->bkc", x, weights[2]) + weights[3][None]
        return x

    def _train_step(self, features, labels, example_weights, seed, num_classes, label_smoothing):
        weights = self.weights
        with tf.GradientTape() as tape:
            logits = self.logits(weights, features, training=True, seed=seed)                   # [b, k, c]
            targets = tf.broadcast_to(tf.one_hot(labels, num_classes)[:, None], tf.shape(logits))
            per_example = tf.keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=label_smoothing) * example_weights[:, None]
            losses = tf.reduce_mean(per_example, axis=0)                                         # [k]
            decay = tf.gather(self.weight_decays, self.slots)
            squares = tf.reduce_sum(tf.square(weights[0]), axis=[0, 2])
            if len(weights) == 4:
                squares += tf.reduce_sum(tf.square(weights[2]), axis=[1, 2])
            total = tf.reduce_sum(losses + 0.5 * decay * squares)
        gradients = tape.gradient(total, weights)
        lr = tf.gather(self.learning_rates, self.slots)
        for i, (w, g) in enumerate(zip(weights, gradients)):       # RMSProp exactly as keras.optimizers
            shape = [1] * w.shape.rank
            shape[self._slot_axis(i)] = -1
            velocity = self.velocities[i].assign(self.rho * self.velocities[i] + (1 - self.rho) * tf.square(g))
            increment = tf.reshape(lr, shape) * g / tf.sqrt(velocity + self.epsilon)
            if self.moments:
                increment = self.moments[i].assign(self.momentum * self.moments[i] + increment)
            w.assign_sub(increment)
        correct = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 2, output_type=tf.int32), labels[:, None]),
                                         tf.float32), axis=0)
        return losses, correct

    def train_step(self, features, labels, example_weights, seed, num_classes: int, label_smoothing: float):
        """One RMSProp step of every training slot; returns their (losses, accuracies) on the batch."""
        args = (features, labels, example_weights, seed, num_classes, label_smoothing)
        if self._step_checked:
            return self._step_fn(*args)
        try:
            result = self._step_fn(*args)
        except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError, tf.errors.InternalError) as e:
            log.warning("head search: XLA could not compile the training step here (%s); using the plain "
                        "TensorFlow step, about twice as slow", str(e).splitlines()[0][:200])
            self._step_fn = self._plain_step
            result = self._step_fn(*args)
        self._step_checked = True
        return result

    def evaluate(self, features: np.ndarray, labels: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Every training slot's validation (loss, accuracy), as two arrays in slot order."""
        k = int(tf.shape(self.slots)[0])
        loss_sum, correct = np.zeros(k), np.zeros(k)
        for lo in range(0, len(labels), batch):
            logits = self._logits_fn(tf.constant(features[lo:lo + batch]))                      # [b, k, c]
            y = tf.constant(labels[lo:lo + batch])
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.broadcast_to(y[:, None], tf.shape(logits)[:2]),
                                                                logits)
            loss_sum += tf.reduce_sum(ce, axis=0).numpy()
            correct += tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 2, output_type=tf.int32), y[:, None]),
                                             tf.float32), axis=0).numpy()
        return loss_sum / max(len(labels), 1), correct / max(len(labels), 1)

    def keep_best(self, slots: np.ndarray) -> None:
        """Copy the current weights of these training slots into their candidates' best-step weights."""
        if len(slots):
            index = tf.constant(slots, tf.int32)
            candidates = tf.gather(self.slots, index)
            for i, (w, best) in enumerate(zip(self.weights, self.best_weights)):
                value = tf.gather(w, index, axis=self._slot_axis(i))
                best.scatter_update(tf.IndexedSlices(self._to_slots(i, value), candidates))

    def compact(self, keep: np.ndarray) -> None:
        """Keep only these training slots (in this order): the others stopped or were pruned."""
        index = tf.constant(keep, tf.int32)
        for i, variables in enumerate(zip(self.weights, self.velocities, *([self.moments] if self.moments else []))):
            for v in variables:
                v.assign(tf.gather(v, index, axis=self._slot_axis(i)))
        self.slots.assign(tf.gather(self.slots, index))

    def best_of(self, k: int) -> list[np.ndarray]:
        """Candidate k's weights at its best validation step (kernel, bias[, kernel, bias])."""
        return [best[k].numpy() for best in self.best_weights]


TRAINING, STOPPED, PRUNED = 0, 1, 2


class SearchRecord(tf.Module):
    """Per-candidate bookkeeping, as variables so it is checkpointed: best validation loss, its accuracy and
    step, evaluations since the last improvement, and status (training / stopped / pruned)."""

    def __init__(self, num_candidates: int):
        super().__init__(name="search_record")
        k = num_candidates
        self.best_loss = tf.Variable(tf.fill([k], np.inf), name="best_loss")
        self.best_accuracy = tf.Variable(tf.zeros([k]), name="best_accuracy")
        self.best_step = tf.Variable(tf.zeros([k], tf.int64), name="best_step")
        self.stalled = tf.Variable(tf.zeros([k], tf.int64), name="stalled")
        self.status = tf.Variable(tf.zeros([k], tf.int64), name="status")
        self.rungs_done = tf.Variable(0, dtype=tf.int64, name="rungs_done")
        self.evaluated_step = tf.Variable(-1, dtype=tf.int64, name="evaluated_step")

    def active(self) -> np.ndarray:
        """Indices of the candidates still training."""
        return np.flatnonzero(self.status.numpy() == TRAINING).astype(np.int32)

    def leader(self) -> int:
        """The candidate with the lowest best validation loss so far (the selection)."""
        return int(np.argmin(self.best_loss.numpy()))


@dataclass
class SearchPolicy:
    """When to halve a learning rate, stop a candidate, prune at a rung."""
    patience: int                # evaluations without a lower validation loss before a candidate stops
    first_rung_step: int         # successive halving: rungs at this step, then RUNG_GROWTH times further

    def rung_step(self, rung: int) -> int:
        return self.first_rung_step * RUNG_GROWTH ** rung


class HeadSearch:
    """Trains the stacked candidates on standardized cached vectors and keeps the best step of the best."""

    def __init__(self, candidates: list[Candidate], heads: StackedHeads, record: SearchRecord,
                 policy: SearchPolicy, num_classes: int, label_smoothing: float, mean: np.ndarray,
                 std: np.ndarray):
        self.candidates, self.heads, self.record, self.policy = candidates, heads, record, policy
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mean, self.std = mean, std
        self.members: list[int] = []      # the candidates averaged into the head by the last write_selected

    def train_step(self, features, labels, example_weights, seed):
        """One step of every training candidate; returns the leader's batch loss and accuracy (another
        candidate's while the leader is not training) for the progress display. A candidate whose loss is
        not finite stops (its best step so far stays eligible): the others carry on."""
        losses, accuracies = (t.numpy() for t in self.heads.train_step(
            features, labels, example_weights, seed, self.num_classes, self.label_smoothing))
        slots = self.heads.slots.numpy()
        finite = np.isfinite(losses)
        leader = np.flatnonzero((slots == self.record.leader()) & finite)
        i = int(leader[0]) if len(leader) else int(np.argmax(finite))
        result = losses[i], accuracies[i]
        if not finite.all() and finite.any():
            for k, loss in zip(slots[~finite], losses[~finite]):
                log.warning("head search: candidate %s diverged at step %d (loss %s); it stops, the others go on",
                            _describe(self.candidates[k]), int(seed[1]) + 1, loss)
            status = self.record.status.numpy()
            status[slots[~finite]] = STOPPED
            self._set_status(status)
        return result

    def _set_status(self, status: np.ndarray) -> None:
        """Record candidates' statuses and drop the ones no longer training from the training slots."""
        self.record.status.assign(status)
        slots = self.heads.slots.numpy()
        keep = np.flatnonzero(status[slots] == TRAINING)
        if len(keep) < len(slots):
            self.heads.compact(keep)

    def done(self) -> bool:
        """True once no candidate is still training."""
        return len(self.record.active()) == 0

    def evaluate(self, step: int, features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """Validate every candidate: keep improved weights, halve stalled learning rates, stop and prune.
        Returns the selected candidate's best (validation loss, accuracy). Evaluating a step twice (a resumed
        run that had finished) changes nothing."""
        record = self.record
        if int(record.evaluated_step.numpy()) != step:
            self._update(step, *self.heads.evaluate(features, labels))
            record.evaluated_step.assign(step)
        leader = record.leader()
        return float(record.best_loss[leader].numpy()), float(record.best_accuracy[leader].numpy())

    def _update(self, step: int, losses: np.ndarray, accuracies: np.ndarray) -> None:
        record, slots = self.record, self.heads.slots.numpy()
        improved = np.flatnonzero(losses < record.best_loss.numpy()[slots])   # slot positions
        self.heads.keep_best(improved)
        if len(improved):  # one assignment per variable: per-candidate assignments were most of an evaluation
            for variable, values in ((record.best_loss, losses[improved]),
                                     (record.best_accuracy, accuracies[improved]), (record.best_step, step)):
                array = variable.numpy()
                array[slots[improved]] = values
                variable.assign(array)
        stalled = record.stalled.numpy()
        stalled[slots] += 1
        stalled[slots[improved]] = 0
        record.stalled.assign(stalled)
        window = max(self.policy.patience // 2, 1)
        rates = self.heads.learning_rates.numpy()
        halve = slots[stalled[slots] % window == 0]
        rates[halve[stalled[halve] > 0]] *= 0.5
        self.heads.learning_rates.assign(rates)
        status = record.status.numpy()
        status[slots[stalled[slots] >= self.policy.patience]] = STOPPED
        rung = int(record.rungs_done.numpy())
        if step >= self.policy.rung_step(rung):
            status = self._prune(status)
            record.rungs_done.assign(rung + 1)
        self._set_status(status)

    def _prune(self, status: np.ndarray) -> np.ndarray:
        alive = np.flatnonzero(status != PRUNED)
        keep = max(1, math.ceil(len(alive) * RUNG_KEEP))
        ranked = alive[np.argsort(self.record.best_loss.numpy()[alive], kind="stable")]
        status[ranked[keep:]] = PRUNED
        return status

    def standardize(self, features: np.ndarray) -> np.ndarray:
        """Vectors standardized as the head does it (the candidates train on standardized vectors); one new
        array, no temporary (the validation split is standardized whole)."""
        out = np.subtract(features, self.mean, dtype=np.float32)
        out /= self.std
        return out

    def write_selected(self, head, features: np.ndarray | None = None, labels: np.ndarray | None = None) -> None:
        """Put the selection into `head` (an ordinary Head): the leader's best-step weights, or, given the
        validation split at the end, the greedy soup of linear candidates (see `soup`)."""
        members = self.soup(features, labels) if features is not None else [self.record.leader()]
        weights = [np.mean(parts, axis=0) for parts in zip(*(self.heads.best_of(k) for k in members))]
        layers = [head.hidden, head.logits] if head.hidden is not None else [head.logits]
        for layer, kernel, bias in zip(layers, weights[0::2], weights[1::2]):
            layer.kernel.assign(kernel)
            layer.bias.assign(bias)
        self.members = members

    def soup(self, features: np.ndarray, labels: np.ndarray) -> list[int]:
        """Greedy soup: candidates by best validation loss, each averaged in only if the average's validation
        loss drops. For linear heads averaging weights is averaging logits, an ensemble in one head; heads
        with a hidden layer are not averaged (independent hidden units do not line up)."""
        order = [int(k) for k in np.argsort(self.record.best_loss.numpy(), kind="stable")
                 if np.isfinite(self.record.best_loss[k].numpy())]
        if self.heads.hidden_units or len(order) < 2:
            return order[:1]
        members, total = [order[0]], [w.astype(np.float64) for w in self.heads.best_of(order[0])]
        best_loss = self._loss([w.astype(np.float32) for w in total], features, labels)
        for k in order[1:]:
            trial = [t + w for t, w in zip(total, self.heads.best_of(k))]
            loss = self._loss([(t / (len(members) + 1)).astype(np.float32) for t in trial], features, labels)
            if loss < best_loss:
                members, total, best_loss = members + [k], trial, loss
        return members

    def _loss(self, weights: list[np.ndarray], features: np.ndarray, labels: np.ndarray, batch: int = 4096) -> float:
        """Mean validation cross-entropy of one head's weights, in batches (never all the logits at once)."""
        one_slot = [tf.constant(w[:, None] if i == 0 else w[None]) for i, w in enumerate(weights)]
        total = 0.0
        for lo in range(0, len(labels), batch):
            logits = self.heads.logits(one_slot, tf.constant(features[lo:lo + batch]))[:, 0]
            total += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels[lo:lo + batch],
                                                                                         logits)))
        return total / max(len(labels), 1)

    def log_selection(self) -> None:
        """Say which candidate was chosen, on what evidence, and what happened to the others."""
        record, leader = self.record, self.record.leader()
        status = record.status.numpy()
        log.info("head search: %s chosen from %d candidates (lowest validation loss, %.4f, accuracy %.4f at step "
                 "%d)%s; %d pruned by successive halving, %d stopped early, %d trained to the end of the budget",
                 _describe(self.candidates[leader]), len(self.candidates), float(record.best_loss[leader]),
                 float(record.best_accuracy[leader]), int(record.best_step[leader]),
                 f", averaged with {len(self.members) - 1} more that lowered the validation loss further"
                 if len(self.members) > 1 else "", int((status == PRUNED).sum()), int((status == STOPPED).sum()),
                 int((status == TRAINING).sum()))

    def summary(self) -> SearchSummary:
        """Every candidate's record, the selected one and those averaged into the head (for summary.json)."""
        record = self.record
        names = {TRAINING: "training", STOPPED: "stopped", PRUNED: "pruned"}
        rows = tuple(CandidateRecord(c.learning_rate, c.weight_decay, _finite(record.best_loss[k]),
                                     _finite(record.best_accuracy[k]), int(record.best_step[k]),
                                     float(self.heads.learning_rates[k].numpy()), names[int(record.status[k])])
                     for k, c in enumerate(self.candidates))
        return SearchSummary(rows, record.leader(), tuple(self.members))


def build_search(candidates: list[Candidate], head, config: "Config", budget: HeadBudget,
                 num_classes: int) -> HeadSearch:
    """The search for `head`'s shape, standardizing with the statistics already set on `head`."""
    heads = StackedHeads(candidates, int(head.feature_mean.shape[0]), num_classes, config.head.hidden_units,
                         config.head.dropout, config.train.seed, config.train.rho, config.train.momentum,
                         config.train.epsilon)
    policy = SearchPolicy(config.train.patience, max(MIN_RUNG_STEPS, budget.eval_every))
    return HeadSearch(candidates, heads, SearchRecord(len(candidates)), policy, num_classes,
                      config.train.label_smoothing, head.feature_mean.numpy(), head.feature_std.numpy())


def _describe(candidate: Candidate) -> str:
    return f"learning rate {candidate.learning_rate:g}, weight decay {candidate.weight_decay:.3g}"


def _finite(value) -> float | None:
    value = float(value.numpy() if hasattr(value, "numpy") else value)
    return round(value, 6) if math.isfinite(value) else None
