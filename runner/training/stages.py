"""The training stages, one class per personality behind one interface: the configured head (FixedHeadStage)
or the head search (HeadSearchStage) on cached vectors, then optionally fine-tuning on images
(FineTuneStage). Each declares what it checkpoints, its budget and its evaluation cadence, and holds its model
parts, step and seed; the loop (runner/training/loop.py) asks it for batches, steps, validations and checkpoints."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from runner.features.backbones import Backbone
from runner.features.cache import BottleneckCache
from runner.training.checkpoints import CheckpointStore
from runner.run.config import Config
from runner.data.scan import Dataset, ImageRecord
from runner.errors import IncompatibleRunError
from runner.training.evaluate import loss_and_accuracy, predict_logits
from runner.training.finetune import ImageBatches, ImageFeatures, unfreeze_top
from runner.training.head import build_optimizer, feature_statistics
from runner.run.records import CheckpointMarker, Evaluation, RunSteps
from runner.run.results import StageResult
from runner.run.rundir import CheckpointRef, MetricsLog, StageCheckpoints
from runner.training.search import build_search, candidate_grid, head_budget
from runner.training.loop import BatchOrder, TrainState, make_train_step

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

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]


def _stage_state(strategy, seed: int, step_name: str) -> TrainState:
    """A stage's step counter and data seed, created under the strategy (both are checkpointed)."""
    with strategy.scope():
        return TrainState(tf.Variable(0, dtype=tf.int64, name=step_name),
                          tf.Variable(seed, dtype=tf.int64, name="data_seed"))


class TrainingStage:
    """What the loop needs of a stage. A subclass builds its model parts, then declares what it checkpoints
    (`checkpoint_items`), its budget (`total_steps`) and evaluation cadence (`eval_every`), and fills in
    next_batch, train_step and validate."""
    name = ""
    starts_the_run = False   # the first stage: started without a checkpoint, the metrics log starts over
    steps_setting = ""       # the setting that sets the budget, named when it is below the step reached

    def __init__(self, checkpoints: StageCheckpoints, keep: int, state: TrainState, marker: CheckpointMarker,
                 total_steps: int, eval_every: int, step_offset: int = 0):
        self.state, self.total_steps, self.eval_every, self.step_offset = state, total_steps, eval_every, step_offset
        self.marker = dataclasses.replace(marker, stage=self.name, steps=RunSteps(step_offset))
        checkpoint = tf.train.Checkpoint(global_step=state.step, data_seed=state.seed, **self.checkpoint_items())
        self.store = CheckpointStore(checkpoints, checkpoint, keep)
        self.restored_eval: Evaluation | None = None
        self.history: list[int] = []   # run-wide steps the run resumed from

    # -- what a stage declares and does -----------------------------------------------------------------
    def checkpoint_items(self) -> dict:
        """The objects this stage's checkpoints hold, besides its step and data seed."""
        raise NotImplementedError

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

    def save(self, step: int, evaluation: Evaluation | None) -> CheckpointRef:
        """Checkpoint the stage at `step` with its latest `evaluation`."""
        return self.store.save(step, dataclasses.replace(self.marker, resumed_from=tuple(self.history),
                                                         evaluation=evaluation))

    def done(self) -> bool:
        """True when the stage stopped early (before its total)."""
        return False

    def conclude(self, result: StageResult) -> StageResult:
        """The stage's result once the loop ended (a stage may add what it alone knows)."""
        return result

    # -- common to every stage ----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The stage's current step."""
        return int(self.state.step.numpy())

    def finished(self) -> bool:
        """Whether nothing is left to train."""
        return self.step >= self.total_steps or self.done()

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
        history = list(ref.marker.resumed_from)
        if ref.local_step > self.total_steps:
            log.warning("%s = %d is below the step this stage already reached (%d); nothing to train, and the "
                        "run keeps step %d (use another run.dir to train fewer steps)", self.steps_setting,
                        self.total_steps, ref.local_step, ref.local_step)
        if not self.finished():  # training continues: this is a resume
            age = time.time() - (ref.marker.saved_at or time.time())
            where = "" if ref.stage == "head" else "fine-tuning "
            print(f"resumed from {where}step {ref.local_step}, checkpoint {_age(age)} old", flush=True)
            history.append(ref.step)
        metrics.trim(ref.step)
        self.history = history or list(earlier_history)
        self.restored_eval = ref.marker.evaluation
        used = int(self.state.seed.numpy())
        if used != configured_seed:
            log.warning("train.seed is %d but this run started with seed %d; keeping %d so the data order "
                        "continues exactly", configured_seed, used, used)


class VectorHeadStage(TrainingStage):
    """What both head stages share: the head trained on cached vectors, standardized with the training split's
    statistics (stored in the head), batches drawn by a seeded epoch-wise order."""
    name = "head"
    starts_the_run = True
    steps_setting = "the head's step budget (train.steps / train.epochs)"

    def __init__(self, config: Config, head, train: Split, val: Split, state: TrainState, marker: CheckpointMarker,
                 checkpoints: StageCheckpoints, eval_every: int, step_offset: int):
        self.config, self.head, self.train, self.val = config, head, train, val
        budget = head_budget(config.train, len(train))
        super().__init__(checkpoints, config.checkpoint.max_to_keep, state, marker, budget.steps, eval_every,
                         step_offset)
        self._val_features = self.inputs(val.table.all())
        self._order: BatchOrder | None = None  # made at the first batch: the seed comes from the checkpoint

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """What the training step takes for these cached vectors."""
        return features

    def next_batch(self, step: int) -> tuple:
        if self._order is None:
            self._order = BatchOrder(len(self.train), self.config.train.batch_size, int(self.state.seed.numpy()))
        rows = self._order.indices(step)
        return self.inputs(self.train.table.gather(rows)), self.train.labels[rows]


class FixedHeadStage(VectorHeadStage):
    """head.search = off (or no validation split): exactly the configured head, RMSProp at train.learning_rate
    (decayed by train.decay_rate), L2 head.weight_decay, validated every eval.every_steps, the last step kept."""

    def __init__(self, config: Config, strategy, head, train: Split, val: Split, class_weights: np.ndarray,
                 marker: CheckpointMarker, checkpoints: StageCheckpoints, step_offset: int = 0):
        head.set_standardization(*feature_statistics(train.table))
        with strategy.scope():
            self.optimizer = build_optimizer(config.train, head.trainable_variables)
        self.head = head
        self._step = make_head_step(head, self.optimizer, strategy, config, len(class_weights))
        super().__init__(config, head, train, val, _stage_state(strategy, config.train.seed, "global_step"), marker,
                         checkpoints, config.eval.every_steps, step_offset)

    def checkpoint_items(self) -> dict:
        return {"head": self.head, "optimizer": self.optimizer}

    def train_step(self, inputs, labels, weights, seed):
        return self._step(inputs, labels, weights, seed)

    def validate(self, step: int) -> tuple:
        return loss_and_accuracy(predict_logits(self.head, self._val_features), self.val.labels)


class HeadSearchStage(VectorHeadStage):
    """head.search = auto: the stacked candidate heads (runner/training/search.py) on one device, validated once per epoch;
    every checkpoint holds the best head so far, the last one the final soup."""

    def __init__(self, config: Config, head, train: Split, val: Split, class_weights: np.ndarray, marker: CheckpointMarker,
                 checkpoints: StageCheckpoints, step_offset: int = 0):
        head.set_standardization(*feature_statistics(train.table))
        budget = head_budget(config.train, len(train))
        self.head = head
        self.search = build_search(candidate_grid(len(train)), head, config, budget, head.num_classes)
        one_device = tf.distribute.get_strategy()
        super().__init__(config, head, train, val, _stage_state(one_device, config.train.seed, "global_step"),
                         marker, checkpoints, budget.eval_every, step_offset)

    def checkpoint_items(self) -> dict:
        return {"head": self.head, "search": self.search.heads, "search_record": self.search.record}

    def loop_strategy(self, strategy):
        """The stacked candidates train on one device (they are small), whatever train.strategy."""
        return tf.distribute.get_strategy()

    def inputs(self, features: np.ndarray) -> np.ndarray:
        return self.search.standardize(features)

    def train_step(self, inputs, labels, weights, seed):
        return self.search.train_step(inputs, labels, weights, seed)

    def validate(self, step: int) -> tuple:
        return self.search.evaluate(step, self._val_features, self.val.labels)

    def done(self) -> bool:
        return self.search.done()

    def save(self, step: int, evaluation: Evaluation | None) -> CheckpointRef:
        if step >= self.total_steps or self.search.done():  # the last checkpoint: the final soup
            self.search.write_selected(self.head, self._val_features, self.val.labels)
            evaluation = self._with_head_validation(evaluation, step)
        else:
            self.search.write_selected(self.head)
        return super().save(step, evaluation)

    def _with_head_validation(self, evaluation: Evaluation | None, step: int) -> Evaluation:
        """`evaluation` with the validation figures of the selected head as it is now."""
        base = evaluation or Evaluation(step=self.step_offset + step, stage=self.name, stage_step=step)
        return base.with_validation(*val_loss_and_accuracy(self.head, self.val))

    def conclude(self, result: StageResult) -> StageResult:
        if result.stopped_by:
            return result
        self.search.log_selection()
        return dataclasses.replace(result, search=self.search.summary(),
                                   last_eval=self._with_head_validation(result.last_eval, result.step))


def build_head_stage(config: Config, strategy, head, train: Split, val: Split, class_weights: np.ndarray,
                     marker: CheckpointMarker, checkpoints: StageCheckpoints, step_offset: int = 0) -> VectorHeadStage:
    """The head stage of head.search: the search, or the configured head (also, with a warning, when there is no
    validation split to choose with); its run-wide steps start after `step_offset`."""
    if config.head.search == "auto" and len(val) == 0:
        log.warning("head.search = auto needs validation images to choose a head, and this run has none "
                    "(split.validation_percent = %g); training the configured head (learning rate %g) "
                    "instead. Raise split.validation_percent to let validation choose.",
                    config.split.validation_percent, config.train.learning_rate)
    if config.head.search == "auto" and len(val) > 0:
        return HeadSearchStage(config, head, train, val, class_weights, marker, checkpoints, step_offset)
    return FixedHeadStage(config, strategy, head, train, val, class_weights, marker, checkpoints, step_offset)


class FineTuneStage(TrainingStage):
    """Fine-tuning: the top of the backbone unfrozen, trained with the head on augmented images."""
    name = "finetune"
    steps_setting = "fine_tune.steps"

    def __init__(self, config: Config, strategy, backbone: Backbone, head, train: Split, val: Split,
                 class_weights: np.ndarray, features_of: ImageFeatures, step_offset: int, head_learning_rate: float,
                 marker: CheckpointMarker, checkpoints: StageCheckpoints):
        ft = config.fine_tune
        self.config, self.backbone, self.head, self.train, self.val = config, backbone, head, train, val
        self.features_of = features_of
        unfrozen = unfreeze_top(backbone, ft)
        variables = backbone.model.trainable_variables + head.trainable_variables
        learning_rate = ft.learning_rate or head_learning_rate / 10
        with strategy.scope():
            self.optimizer = build_optimizer(ft, variables, learning_rate)
        super().__init__(checkpoints, config.checkpoint.max_to_keep,
                         _stage_state(strategy, config.train.seed, "finetune_step"), marker, ft.steps,
                         ft.eval_every_steps, step_offset)
        log.info("fine-tuning %d backbone layers (BatchNormalization frozen) at learning rate %g",
                 unfrozen, learning_rate)

        def forward(images, seed):
            return head(backbone.model(images, training=False), training=True, dropout_seed=seed)

        self._step = make_train_step(forward, variables, self.optimizer, strategy, ft.batch_size, len(class_weights),
                                     ft.label_smoothing)
        self._batches: ImageBatches | None = None  # made at the first batch, from the restored step and seed

    def checkpoint_items(self) -> dict:
        return {"head": self.head, "backbone": self.backbone.model, "optimizer": self.optimizer}

    def next_batch(self, step: int) -> tuple:
        if self._batches is None:
            ft, seed, start = self.config.fine_tune, int(self.state.seed.numpy()), self.step
            order = BatchOrder(len(self.train), ft.batch_size, seed)
            self._batches = ImageBatches(self.train.paths, self.train.labels, order, self.backbone.image_size,
                                         seed, ft, start, max(ft.steps, start), self.backbone.decode)
        return self._batches(step)

    def train_step(self, inputs, labels, weights, seed):
        return self._step(inputs, labels, weights, seed)

    def validate(self, step: int) -> tuple:
        return loss_and_accuracy(predict_logits(self.head, self.features_of(self.val.paths)), self.val.labels)


def make_head_step(head, optimizer, strategy, config: Config, num_classes: int):
    """The compiled step of the head stage (head.search = off): cross-entropy plus head.weight_decay L2."""
    decay = config.head.weight_decay
    kernels = [v for v in head.trainable_variables if "kernel" in v.path]

    def l2():
        return 0.5 * decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
    return make_train_step(lambda features, seed: head(features, training=True, dropout_seed=seed),
                           head.trainable_variables, optimizer, strategy, config.train.batch_size, num_classes,
                           config.train.label_smoothing, l2 if decay > 0 else None)


def val_loss_and_accuracy(head, val: Split) -> tuple[float | None, float | None]:
    """The validation loss and accuracy of `head` as it is now."""
    return loss_and_accuracy(predict_logits(head, val.table.all()), val.labels)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
