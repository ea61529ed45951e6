"""The training stages as objects with one interface: the head on cached vectors, then (optionally)
fine-tuning on images. Each holds its model parts, optimizer, step, seed and checkpoints on self; the
loop (runner/train.py) asks it for batches, steps, validations and checkpoints."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from runner.backbones import Backbone
from runner.cache import BottleneckCache
from runner.checkpoints import CheckpointStore
from runner.config import Config
from runner.data import Dataset, ImageRecord
from runner.errors import IncompatibleRunError
from runner.evaluate import loss_and_accuracy, predict_logits
from runner.finetune import ImageBatches, ImageFeatures, unfreeze_top
from runner.head import build_optimizer, feature_statistics
from runner.rundir import CheckpointRef, MetricsLog, StageCheckpoints
from runner.search import HeadSearch, build_search, candidate_grid, head_budget
from runner.train import BatchOrder, TrainState, make_train_step

log = logging.getLogger("runner")


@dataclass
class Split:
    """One split's images, their labels and (for the head) their cached vectors."""
    records: list[ImageRecord]
    labels: np.ndarray
    table: object

    @classmethod
    def of(cls, dataset: Dataset, cache: BottleneckCache, name: str) -> "Split":
        records = dataset.split(name)
        return cls(records, np.array([r.label for r in records], np.int32),
                   cache.table([r.sha256 for r in records]))

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]


class TrainingStage:
    """What the loop needs of a stage; subclasses build the model parts and fill in the four methods."""
    name = ""
    starts_the_run = False   # the first stage: started without a checkpoint, the metrics log starts over

    def __init__(self, store: CheckpointStore, state: TrainState, marker: dict, total_steps: int,
                 step_offset: int, eval_every: int, steps_setting: str):
        self.store, self.state, self.total_steps = store, state, total_steps
        self.step_offset, self.eval_every, self.steps_setting = step_offset, eval_every, steps_setting
        self.marker = dict(marker, stage=self.name, step_offset=step_offset)
        self.restored_eval: dict = {}
        self.history: list[int] = []   # run-wide steps the run resumed from

    # -- what the loop calls ----------------------------------------------------------------------------
    def loop_strategy(self, strategy):
        """The strategy the loop distributes batches with."""
        return strategy

    def next_batch(self, step: int) -> tuple:
        """The (inputs, int32 labels) of a stage step, as numpy."""
        raise NotImplementedError

    def train_step(self, inputs, labels, weights, seed):
        """One compiled training step → (loss, accuracy)."""
        raise NotImplementedError

    def validate(self, step: int) -> tuple:
        """(validation loss, accuracy) at a stage step; (None, None) without a validation split."""
        raise NotImplementedError

    def save(self, step: int, metrics: dict) -> CheckpointRef:
        """Checkpoint the stage at `step` with the evaluation `metrics`."""
        return self.store.save(step, dict(self.marker, resumed_from=self.history, metrics=metrics))

    def done(self) -> bool:
        """True when the stage stopped early (before its total)."""
        return False

    @property
    def step(self) -> int:
        """The stage's current step."""
        return int(self.state.step.numpy())

    def finished(self) -> bool:
        """Whether nothing is left to train."""
        return self.step >= self.total_steps or self.done()

    def conclude(self, result):
        """What the stage adds to the loop's result once it ended."""
        return result

    # -- restore ---------------------------------------------------------------------------------------
    def restore(self, metrics: MetricsLog, configured_seed: int, earlier_history: list[int] = ()) -> None:
        """Load the newest usable checkpoint (say so, trim the metrics log to it), or start from scratch."""
        ref = self.store.restore()
        if ref is None:
            if self.store.stage.steps():
                raise IncompatibleRunError(f"no checkpoint in {self.store.dir} could be loaded (see the warnings "
                                           f"above); move that folder away to start this stage over.")
            if self.starts_the_run:
                metrics.reset()
            self.history = list(earlier_history)
            return
        history = list(ref.marker.get("resumed_from", []))
        if ref.local_step > self.total_steps:
            log.warning("%s = %d is below the step this stage already reached (%d); nothing to train, and the "
                        "run keeps step %d (use another run.dir to train fewer steps)", self.steps_setting,
                        self.total_steps, ref.local_step, ref.local_step)
        if not self.finished():  # training continues: this is a resume
            age = time.time() - ref.marker.get("saved_at", time.time())
            where = "" if ref.stage == "head" else "fine-tuning "
            print(f"resumed from {where}step {ref.local_step}, checkpoint {_age(age)} old", flush=True)
            history.append(ref.step)
        metrics.trim(ref.step)
        self.history = history or list(earlier_history)
        self.restored_eval = ref.marker.get("metrics", {})
        used = int(self.state.seed.numpy())
        if used != configured_seed:
            log.warning("train.seed is %d but this run started with seed %d; keeping %d so the data order "
                        "continues exactly", configured_seed, used, used)


class HeadStage(TrainingStage):
    """The head on cached vectors: the search over stacked candidate heads (head.search = auto) or the
    configured head with RMSProp (head.search = off)."""
    name = "head"
    starts_the_run = True

    def __init__(self, config: Config, strategy, head, train: Split, val: Split, class_weights: np.ndarray,
                 marker: dict, checkpoints: StageCheckpoints):
        head.set_standardization(*feature_statistics(train.table))
        self.config, self.head, self.train, self.val = config, head, train, val
        self.search = make_search(config, head, train, val)
        with strategy.scope():
            state = TrainState(tf.Variable(0, dtype=tf.int64, name="global_step"),
                               tf.Variable(config.train.seed, dtype=tf.int64, name="data_seed"))
        if self.search is None:
            with strategy.scope():
                optimizer = build_optimizer(config.train, head.trainable_variables)
            parts = {"optimizer": optimizer}
            self._step = make_head_step(head, optimizer, strategy, config, len(class_weights))
        else:
            parts = {"search": self.search.heads, "search_record": self.search.record}
            self._step = self.search.train_step
        checkpoint = tf.train.Checkpoint(head=head, global_step=state.step, data_seed=state.seed, **parts)
        budget = head_budget(config.train, len(train.records))
        super().__init__(CheckpointStore(checkpoints, checkpoint, config.checkpoint.max_to_keep), state, marker,
                         budget.steps, 0, budget.eval_every if self.search else config.eval.every_steps,
                         "the head's step budget (train.steps / train.epochs)")
        self._prepare = self.search.standardize if self.search else (lambda features: features)
        self._val_features = self._prepare(val.table.all())
        self._order: BatchOrder | None = None  # made at the first batch: the seed comes from the checkpoint

    def loop_strategy(self, strategy):
        """The search trains its stacked candidates on one device (they are small), whatever train.strategy."""
        return tf.distribute.get_strategy() if self.search is not None else strategy

    def next_batch(self, step: int) -> tuple:
        if self._order is None:
            self._order = BatchOrder(len(self.train.records), self.config.train.batch_size, int(self.state.seed.numpy()))
        rows = self._order.indices(step)
        return self._prepare(self.train.table.gather(rows)), self.train.labels[rows]

    def train_step(self, inputs, labels, weights, seed):
        return self._step(inputs, labels, weights, seed)

    def validate(self, step: int) -> tuple:
        if self.search is not None:
            return self.search.evaluate(step, self._val_features, self.val.labels)
        return loss_and_accuracy(predict_logits(self.head, self._val_features), self.val.labels)

    def done(self) -> bool:
        return self.search is not None and self.search.done()

    def save(self, step: int, metrics: dict) -> CheckpointRef:
        if self.search is not None:
            # every checkpoint holds the best head so far, ready to export; the last one the final soup
            if step >= self.total_steps or self.search.done():
                self.search.write_selected(self.head, self._val_features, self.val.labels)
                metrics = dict(metrics, **val_metrics(self.head, self.val))
            else:
                self.search.write_selected(self.head)
        return super().save(step, metrics)

    def conclude(self, result):
        if self.search is not None and not result.stopped_by:
            self.search.log_selection()
            result.search = self.search.summary()
            result.last_eval = dict(result.last_eval, **val_metrics(self.head, self.val))
        return result


class FineTuneStage(TrainingStage):
    """Fine-tuning: the top of the backbone unfrozen, trained with the head on augmented images."""
    name = "finetune"

    def __init__(self, config: Config, strategy, backbone: Backbone, head, train: Split, val: Split,
                 class_weights: np.ndarray, features_of: ImageFeatures, head_steps: int, head_learning_rate: float,
                 marker: dict, checkpoints: StageCheckpoints):
        ft = config.fine_tune
        self.config, self.backbone, self.head, self.train, self.val = config, backbone, head, train, val
        self.features_of = features_of
        unfrozen = unfreeze_top(backbone, ft)
        variables = backbone.model.trainable_variables + head.trainable_variables
        with strategy.scope():
            ft_train = dataclasses.replace(config.train, learning_rate=ft.learning_rate or head_learning_rate / 10)
            optimizer = build_optimizer(ft_train, variables)
            state = TrainState(tf.Variable(0, dtype=tf.int64, name="finetune_step"),
                               tf.Variable(config.train.seed, dtype=tf.int64, name="data_seed"))
        checkpoint = tf.train.Checkpoint(head=head, backbone=backbone.model, optimizer=optimizer,
                                         global_step=state.step, data_seed=state.seed)
        super().__init__(CheckpointStore(checkpoints, checkpoint, config.checkpoint.max_to_keep), state, marker,
                         ft.steps, head_steps, config.eval.every_steps, "fine_tune.steps")
        log.info("fine-tuning %d backbone layers (BatchNormalization frozen) at learning rate %g",
                 unfrozen, ft_train.learning_rate)

        def forward(images, seed):
            return head(backbone.model(images, training=False), training=True, dropout_seed=seed)

        self._step = make_train_step(forward, variables, optimizer, strategy, ft.batch_size, len(class_weights),
                                     config.train.label_smoothing)
        self._batches: ImageBatches | None = None  # made at the first batch, from the restored step and seed

    def next_batch(self, step: int) -> tuple:
        if self._batches is None:
            ft, seed, start = self.config.fine_tune, int(self.state.seed.numpy()), self.step
            order = BatchOrder(len(self.train.records), ft.batch_size, seed)
            self._batches = ImageBatches(self.train.paths, self.train.labels, order, self.backbone.image_size,
                                         seed, ft, start, max(ft.steps, start))
        return self._batches(step)

    def train_step(self, inputs, labels, weights, seed):
        return self._step(inputs, labels, weights, seed)

    def validate(self, step: int) -> tuple:
        return loss_and_accuracy(predict_logits(self.head, self.features_of(self.val.paths)), self.val.labels)


def make_search(config: Config, head, train: Split, val: Split) -> HeadSearch | None:
    """The head search of head.search = auto, or None to train the configured head (also, with a warning,
    when there is no validation split to choose with)."""
    if config.head.search == "off":
        return None
    if len(val.records) == 0:
        log.warning("head.search = auto needs validation images to choose a head, and this run has none "
                    "(split.validation_percent = %g); training the configured head (learning rate %g) "
                    "instead. Raise split.validation_percent to let validation choose.",
                    config.split.validation_percent, config.train.learning_rate)
        return None
    budget = head_budget(config.train, len(train.records))
    return build_search(candidate_grid(len(train.records)), head, config, budget, head.num_classes)


def make_head_step(head, optimizer, strategy, config: Config, num_classes: int):
    """The compiled step of the head stage (head.search = off): cross-entropy plus head.weight_decay L2."""
    decay = config.head.weight_decay
    kernels = [v for v in head.trainable_variables if "kernel" in v.path]

    def l2():
        return 0.5 * decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
    return make_train_step(lambda features, seed: head(features, training=True, dropout_seed=seed),
                           head.trainable_variables, optimizer, strategy, config.train.batch_size, num_classes,
                           config.train.label_smoothing, l2 if decay > 0 else None)


def val_metrics(head, val: Split) -> dict:
    """The validation loss and accuracy of `head` as it is now."""
    loss, accuracy = loss_and_accuracy(predict_logits(head, val.table.all()), val.labels)
    return {"val_loss": loss, "val_accuracy": accuracy}


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
