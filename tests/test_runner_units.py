"""The runner's pieces, in process and fast: batch order, checkpoint fallback, cache shards, compatibility,
settings and the supervisor's arguments."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from common.errors import ProjectError
from runner.run.config import load_config, to_toml
from runner.training.events import Listener
from runner.errors import IncompatibleRunError, RunnerError
from runner.run.records import CheckpointMarker, Evaluation
from runner.run.rundir import RunDir
from tests.helpers import REPO

LOCAL = REPO / "configs" / "clothing_local.toml"


def test_a_batch_across_an_epoch_boundary_ends_one_permutation_and_starts_the_next():
    from runner.training.loop import BatchOrder
    order = BatchOrder(num_rows=10, batch_size=4, seed=3)
    epoch0 = np.random.default_rng([3, 0]).permutation(10)
    epoch1 = np.random.default_rng([3, 1]).permutation(10)
    assert order.indices(0).tolist() == epoch0[:4].tolist()
    assert order.indices(2).tolist() == epoch0[8:].tolist() + epoch1[:2].tolist()
    assert order.indices(3).tolist() == epoch1[2:6].tolist()
    seen = np.concatenate([order.indices(s) for s in range(5)])  # 20 rows: two full epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import tensorflow as tf
    from runner.training.checkpoints import CheckpointStore
    variable = tf.Variable([0.0, 0.0])
    store = CheckpointStore(RunDir(tmp_path).stage("head"), tf.train.Checkpoint(v=variable), keep=3)
    for step in (1, 2, 3):
        variable.assign([step, step])
        store.save(step, CheckpointMarker())
    data = next(p for p in store.stage.data_files(3) if ".data-" in p.name)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    variable.assign([0.0, 0.0])
    restored = store.restore()
    assert restored.step == 2 and variable.numpy().tolist() == [2.0, 2.0]
    assert "does not match its recorded sha256" in caplog.text and "fell back to step 2" in caplog.text


def test_a_cache_shard_that_cannot_be_read_is_set_aside_and_the_rest_is_used(tmp_path, caplog):
    from runner.features.cache import BottleneckCache
    identity = {"backbone": "x"}
    cache = BottleneckCache(tmp_path, identity, dim=4)
    good = cache.add_shard(["a" * 64, "b" * 64], np.ones((2, 4)))
    bad = cache.add_shard(["c" * 64], np.ones((1, 4)))
    bad.write_bytes(bad.read_bytes()[:20])  # truncated
    reopened = BottleneckCache(tmp_path, identity, dim=4)
    assert reopened.has("a" * 64) and not reopened.has("c" * 64)
    assert good.exists() and not bad.exists() and bad.with_suffix(".corrupt").exists()
    assert "unreadable" in caplog.text
    assert reopened.table(["b" * 64, "a" * 64]).all().tolist() == [[1.0] * 4] * 2


def test_continuing_with_other_classes_or_another_backbone_is_refused_naming_the_change(tmp_path):
    from runner.prepare import check_compatible
    run = RunDir(tmp_path)
    marker = CheckpointMarker(classes=("a", "b"), fingerprint={"backbone": "mobilenet", "image_size": 224})
    check_compatible(marker, {"backbone": "mobilenet", "image_size": 224}, ["a", "b"], run)
    check_compatible(None, {"backbone": "other"}, ["z"], run)  # nothing to continue: anything goes
    with pytest.raises(IncompatibleRunError, match=r"trained on 2 classes, data.dir now has 3 \(added: \['c'\]"):
        check_compatible(marker, marker.fingerprint, ["a", "b", "c"], run)
    with pytest.raises(IncompatibleRunError, match="image_size: 224 → 192.*--set run.dir="):
        check_compatible(marker, {"backbone": "mobilenet", "image_size": 192}, ["a", "b"], run)


def test_image_size_0_means_the_backbones_default_so_it_is_no_change_from_that_size(tmp_path):
    from runner.prepare import check_compatible
    run = RunDir(tmp_path)
    explicit = CheckpointMarker(classes=("a", "b"), fingerprint={"backbone": "mobilenet", "image_size": 224})
    default = CheckpointMarker(classes=("a", "b"), fingerprint={"backbone": "mobilenet", "image_size": 0})
    check_compatible(explicit, {"backbone": "mobilenet", "image_size": 0}, ["a", "b"], run)
    check_compatible(default, {"backbone": "mobilenet", "image_size": 224}, ["a", "b"], run)
    with pytest.raises(IncompatibleRunError, match="image_size: 224 → 192"):
        check_compatible(default, {"backbone": "mobilenet", "image_size": 192}, ["a", "b"], run)
    with pytest.raises(IncompatibleRunError, match="image_size: 224 → 299"):  # 0: inception_v3 default
        check_compatible(CheckpointMarker(classes=("a",), fingerprint={"backbone": "inception_v3", "image_size": 224}),
                         {"backbone": "inception_v3", "image_size": 0}, ["a"], run)


def test_the_supervised_child_gets_the_same_arguments_without_supervise():
    import resume
    argv = ["--config", "c.toml", "--supervise", "3", "--set", "train.steps=5", "--supervise=2", "--debug"]
    assert resume.child_arguments(argv)[1:] == ["--config", "c.toml", "--set", "train.steps=5", "--debug"]


def test_paths_in_a_config_file_are_relative_to_that_file_and_set_paths_to_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    config_file = tmp_path / "configs" / "run.toml"
    config_file.write_text('[data]\ndir = "../photos"\n[run]\ndir = "../runs/a"\n[backbone]\nweights = "w.h5"\n'
                           '[sync]\nfolder = "/abs/remote"\ncredentials = "~/creds.json"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file, ["cache.dir=shared-cache"])
    assert config.data.dir == str(tmp_path / "photos") and config.run.dir == str(tmp_path / "runs" / "a")
    assert config.backbone.weights == str(tmp_path / "configs" / "w.h5")
    assert config.cache.dir == str(tmp_path / "shared-cache") and config.sync.folder == "/abs/remote"
    assert config.sync.credentials == str(Path("~/creds.json").expanduser())
    assert load_config(LOCAL, ["backbone.weights=imagenet"]).backbone.weights == "imagenet"  # a keyword
    drive = load_config(LOCAL, ["sync.backend=drive", "sync.folder=runs/flowers"])
    assert drive.sync.folder == "runs/flowers"  # a Drive folder, not a local path


def test_a_stored_config_loads_on_a_machine_without_the_files_it_names(tmp_path):
    config = load_config(LOCAL, ["sync.backend=drive", "sync.folder=runs/x",
                                 f"sync.credentials={tmp_path / 'gone.json'}"])
    stored = tmp_path / "config.toml"
    stored.write_text(to_toml(config))
    assert load_config(stored) == config  # e.g. python -m runner.export on another machine
    from sync import SyncError
    with pytest.raises(SyncError, match="sync.credentials = .*gone.json'?: no such file"):
        config.sync.check_environment()  # checked when a run starts


def test_the_stored_config_is_valid_toml_and_non_finite_values_never_reach_it(tmp_path):
    tomllib.loads(to_toml(load_config(LOCAL, ["train.epsilon=1e-9", 'run.dir="a \\"quoted\\" dir"'])))
    for bad in ("train.learning_rate=nan", "train.learning_rate=inf", "split.validation_percent=-inf"):
        with pytest.raises(ProjectError, match="must be a finite number"):
            load_config(LOCAL, [bad])
    nan_file = tmp_path / "nan.toml"
    nan_file.write_text('[data]\ndir = "x"\n[train]\nlearning_rate = nan\n')
    with pytest.raises(ProjectError, match="train.learning_rate = nan: it must be a finite number"):
        load_config(nan_file)


def test_a_wrong_type_says_what_was_expected_in_words():
    with pytest.raises(ProjectError, match=r"train.steps = 1.5: expected an integer \(a whole number"):
        load_config(LOCAL, ["train.steps=1.5"])
    with pytest.raises(ProjectError, match="expected true or false"):
        load_config(LOCAL, ["train.deterministic=maybe"])
    with pytest.raises(ProjectError, match=r"expected a number"):
        load_config(LOCAL, ["train.learning_rate=fast"])


LAYOUT_NAMES = ('"checkpoints', "finetune/checkpoints", "ckpt-", '"metrics.jsonl"', '"summary.json"',
                '"test_report.json"', '"head_stage.json"', '"config.toml"', '"labels.json"', "last_snapshot",
                '"export"', '"report"', '"version.json"', '"versions"', '"report.json"')


@pytest.mark.parametrize("package", ["runner", "sync", "common"])
def test_only_rundir_knows_the_run_directory_layout(package):
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name != "rundir.py":
            text = path.read_text()
            assert not [name for name in LAYOUT_NAMES if name in text], path


class _FakeStage:
    """A stage without a model: constant loss, a step counter, checkpoints recorded."""
    name, step_offset, eval_every, total_steps = "head", 0, 5, 10

    def __init__(self, start=0, loss=0.5):
        import tensorflow as tf
        from runner.training.loop import TrainState
        self.state = TrainState(tf.Variable(start, dtype=tf.int64), tf.Variable(0, dtype=tf.int64))
        self.loss, self.saved, self.restored_eval = loss, [], Evaluation(val_accuracy=0.25)

    step = property(lambda self: int(self.state.step.numpy()))

    def finished(self):
        return self.step >= self.total_steps

    def done(self):
        return False

    def next_batch(self, step):
        return np.zeros((2, 1), np.float32), np.zeros(2, np.int32)

    def train_step(self, inputs, labels, weights, seed):
        return self.loss, 1.0

    def validate(self, step):
        return 0.1, 0.9

    def save(self, step, evaluation):
        from runner.run.rundir import CheckpointRef
        self.saved.append((step, evaluation.stage_step if evaluation else None))
        return CheckpointRef("head", step, step, CheckpointMarker(step=step), Path("x"))


class _Recorder(Listener):
    """Every event the loop sends, in order."""

    def __init__(self):
        self.events = []

    def on_start(self, loop):
        self.events.append("start")

    def on_step(self, loop, step, loss, accuracy):
        self.events.append(f"step {step}")

    def on_evaluation(self, loop, record):
        self.events.append(f"evaluation {record.stage_step}")

    def on_checkpoint(self, loop, checkpoint):
        self.events.append(f"checkpoint {checkpoint.local_step}")

    def on_end(self, loop, result):
        self.events.append(f"end {result.step}")


def _loop(stage, *listeners):
    import tensorflow as tf
    from runner.training.events import CheckpointPolicy, Listeners
    from runner.training.loop import StageLoop, StopFlag
    return StageLoop(stage, Listeners(list(listeners)), tf.distribute.get_strategy(), np.ones(1, np.float32),
                     StopFlag(), CheckpointPolicy(4, 0))


def test_the_loop_tells_its_listeners_and_the_cadence_checkpoints_after_the_evaluation_of_a_step(tmp_path):
    from runner.training.events import MetricsLogger
    recorder, stage, metrics = _Recorder(), _FakeStage(), RunDir(tmp_path).metrics
    result = _loop(stage, recorder, MetricsLogger(metrics)).run()
    assert recorder.events == ["start", "step 1", "step 2", "step 3", "step 4", "checkpoint 4", "evaluation 5",
                               "step 5", "step 6", "step 7", "step 8", "checkpoint 8", "step 9", "evaluation 10",
                               "step 10", "checkpoint 10", "end 10"]
    assert stage.saved == [(4, None), (8, 5), (10, 10)]  # each checkpoint carries the latest evaluation
    assert [r["step"] for r in metrics.read()] == [5, 10] and result.trained and result.last_eval.val_accuracy == 0.9


def test_a_stage_with_nothing_left_to_train_sends_no_event_and_writes_nothing():
    recorder, stage = _Recorder(), _FakeStage(start=10)
    result = _loop(stage, recorder).run()
    assert recorder.events == [] and stage.saved == []
    assert not result.trained and result.step == 10 and result.last_eval == Evaluation(val_accuracy=0.25)


def test_a_non_finite_loss_stops_the_loop_before_anything_of_that_step_is_kept():
    from runner.training.loop import TrainingDiverged
    recorder, stage = _Recorder(), _FakeStage(loss=float("nan"))
    with pytest.raises(TrainingDiverged, match="diverged at step 1"):
        _loop(stage, recorder).run()
    assert recorder.events == ["start"] and stage.saved == [] and stage.step == 0


def test_a_listener_hook_that_no_event_calls_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match="on_stpe, which no event calls"):
        class Misspelt(Listener):
            def on_stpe(self, loop, step, loss, accuracy):
                pass


def test_the_checkpoint_policy_is_due_by_steps_or_by_time_counted_from_the_last_save():
    from runner.training.events import CheckpointPolicy
    now = [0.0]
    policy = CheckpointPolicy(every_steps=10, every_seconds=60, clock=lambda: now[0])
    policy.start()
    assert [s for s in range(1, 31) if policy.due(s)] == [10, 20, 30]
    now[0] = 61
    assert policy.due(3)
    policy.saved()
    assert not policy.due(4)
    assert not CheckpointPolicy(0, 0).due(10)
