"""The job's sequencing, in process and fast: prepare → head → fine-tune → finish, typed outcomes, the
hand-overs sync receives, signals, resume and settings a mode ignores. A tiny random MobileNet at 32 px on
generated images keeps each run to seconds."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runner.run.config import load_config
from runner.run.results import Finished, Stopped, Unchanged
from runner.run.rundir import RunDir
from runner.training.loop import StopFlag
from tests.helpers import assert_same_checkpoint, latest_checkpoint_prefix, write_synthetic_dataset


class RecordingSync:
    """What the job sees of sync when sync is off, recording every hand-over (and optionally acting on one)."""
    enabled = False

    def __init__(self, on_hand_over=None):
        self.hand_overs, self.on_hand_over = [], on_hand_over

    def restore_latest(self):
        raise AssertionError("a job with sync off never restores")

    def on_checkpoint(self, hand_over):
        self.hand_overs.append(hand_over)
        if self.on_hand_over is not None:
            self.on_hand_over(hand_over)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny"), num_classes=3, per_class=20, size=40)


def tiny_config(run_dir, data_dir, *extra):
    return load_config(None, [f"data.dir={data_dir}", f"run.dir={run_dir}", "backbone.name=mobilenet",
                              "backbone.weights=none", "backbone.allow_random_weights=true", "backbone.alpha=0.25",
                              "backbone.image_size=32", "train.steps=40", "checkpoint.every_steps=10",
                              "checkpoint.every_seconds=0", "export.enabled=false", "train.progress=lines",
                              "data.min_images_per_class=2", *extra])


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """One finished default run on the tiny data: (config, the sync it handed over to, its outcome)."""
    config = tiny_config(tmp_path_factory.mktemp("tiny-run") / "run", tiny_data)
    sync = RecordingSync()
    return config, sync, _job(config, sync).run()


def test_a_job_hands_over_every_checkpoint_then_the_final_snapshot_and_a_rerun_changes_nothing(tiny_run):
    config, sync, outcome = tiny_run
    assert isinstance(outcome, Finished)
    summary = outcome.summary
    assert summary.global_step == 40 and summary.stage == "head" and summary.num_classes == 3
    assert summary.search is not None and summary.search.selected_candidate.best_step > 0
    assert RunDir(config.run_dir).read_summary() == summary
    assert [h.step for h in sync.hand_overs] == [10, 20, 30, 40, 40]
    final = sync.hand_overs[-1]
    assert final.final and not any(h.final for h in sync.hand_overs[:-1])
    assert "summary.json" in final.files and "summary.json" not in sync.hand_overs[-2].files
    assert all(h.cache_files for h in sync.hand_overs), "every snapshot carries the cache"

    again = RecordingSync()
    second = _job(config, again).run()
    assert isinstance(second, Unchanged) and second.summary == summary and again.hand_overs == []


class RestoringSync(RecordingSync):
    """Sync on, with a remote holding `run`'s final snapshot: restore copies its files (checkpoint data and
    marker, records, results; no TensorFlow state file, as in a real snapshot) and its cache into a new disk."""
    enabled = True

    def __init__(self, source_config, final, target_config):
        super().__init__()
        self.source, self.final, self.target = source_config, final, target_config

    def restore_latest(self):
        import shutil
        for rel in self.final.files:
            (self.target.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.source.run_dir / rel, self.target.run_dir / rel)
        for rel in self.final.cache_files:
            if not (self.source.cache_dir / rel).is_file():
                continue  # the scan index's copy, renamed by the source's rerun since; the shards are there
            (self.target.cache_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.source.cache_dir / rel, self.target.cache_dir / rel)
        return self.final.step

    def holds_final(self, step):
        return step == self.final.step  # the remote holds the final snapshot it restores


def test_a_finished_run_restored_on_a_new_disk_gets_tensorflows_checkpoint_state_file(tiny_run, tiny_data,
                                                                                      tmp_path):
    import tensorflow as tf
    config, sync, outcome = tiny_run
    final = sync.hand_overs[-1]
    assert not any(rel.endswith("/checkpoint") for rel in final.files)  # the snapshot does not carry it
    fresh = tiny_config(tmp_path / "new-disk" / "run", tiny_data)
    second = _job(fresh, RestoringSync(config, final, fresh)).run()
    assert isinstance(second, Unchanged) and second.summary.global_step == 40
    assert tf.train.latest_checkpoint(str(fresh.run_dir / "checkpoints")) == str(fresh.run_dir / "checkpoints" / "ckpt-40")


def test_a_signal_in_training_stops_at_a_checkpoint_and_the_next_job_ends_bit_identical(tiny_run, tiny_data,
                                                                                        tmp_path):
    stop = StopFlag()

    def signal_at_step_20(hand_over):
        if hand_over.step == 20:
            stop.signal_name = "SIGTERM"
    config = tiny_config(tmp_path / "run", tiny_data)
    outcome = _job(config, RecordingSync(signal_at_step_20), stop).run()
    assert outcome == Stopped("SIGTERM", "head training", 20)

    resumed = _job(config, RecordingSync()).run()
    assert isinstance(resumed, Finished) and resumed.summary.resumed_from == [20]
    unbroken = tiny_run[0].run_dir
    assert_same_checkpoint(latest_checkpoint_prefix(unbroken), latest_checkpoint_prefix(tmp_path / "run"))


class Killed(BaseException):
    """A kill: nothing after it runs, no handler sees it."""


def test_tensorflow_finds_the_newest_complete_checkpoint_after_a_kill_between_its_files_and_its_marker(
        tiny_data, tmp_path, monkeypatch):
    import tensorflow as tf
    from runner.run.rundir import StageCheckpoints
    write_marker = StageCheckpoints.write_marker

    def killed_at_step_30(self, marker):
        if marker.step == 30:
            raise Killed()
        write_marker(self, marker)
    monkeypatch.setattr(StageCheckpoints, "write_marker", killed_at_step_30)
    config = tiny_config(tmp_path / "run", tiny_data, "checkpoint.max_to_keep=2")
    with pytest.raises(Killed):
        _job(config, RecordingSync()).run()
    folder = tmp_path / "run" / "checkpoints"
    assert (folder / "ckpt-30.index").exists() and not (folder / "ckpt-30.json").exists()
    assert tf.train.latest_checkpoint(str(folder)) == str(folder / "ckpt-20")
    state = tf.train.get_checkpoint_state(str(folder))
    assert list(state.all_model_checkpoint_paths) == [str(folder / "ckpt-10"), str(folder / "ckpt-20")]

    monkeypatch.undo()
    assert isinstance(_job(config, RecordingSync()).run(), Finished)  # resumes from 20, prunes 10 and 20
    state = tf.train.get_checkpoint_state(str(folder))
    assert list(state.all_model_checkpoint_paths) == [str(folder / "ckpt-30"), str(folder / "ckpt-40")]
    assert all(Path(f"{p}.index").exists() for p in state.all_model_checkpoint_paths)
    assert not (folder / "ckpt-20.index").exists()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(), str(folder), max_to_keep=2)
    assert manager.latest_checkpoint == str(folder / "ckpt-40") == latest_checkpoint_prefix(tmp_path / "run")


def test_a_signal_during_the_scan_stops_before_training_and_keeps_the_hashes_read(tiny_data, tmp_path):
    stop = StopFlag()
    stop.signal_name = "SIGINT"
    config = tiny_config(tmp_path / "run", tiny_data)
    assert _job(config, RecordingSync(), stop).run() == Stopped("SIGINT", "the image scan")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fine_tuning_follows_the_head_stage_with_run_wide_steps(tiny_data, tmp_path):
    config = tiny_config(tmp_path / "run", tiny_data, "fine_tune.enabled=true", "fine_tune.steps=4",
                         "fine_tune.batch_size=8", "train.steps=20")
    sync = RecordingSync()
    outcome = _job(config, sync).run()
    assert isinstance(outcome, Finished)
    assert (outcome.summary.stage, outcome.summary.head_steps, outcome.summary.finetune_steps,
            outcome.summary.global_step) == ("finetune", 20, 4, 24)
    steps = [h.step for h in sync.hand_overs]
    assert steps == [10, 20, 24, 24] and "head_stage.json" in sync.hand_overs[2].files
    import tensorflow as tf  # TensorFlow's state file in both stages' folders names each one's newest
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("checkpoints/ckpt-20")
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "finetune" / "checkpoints")).endswith(
        "finetune/checkpoints/ckpt-4")


def test_a_setting_the_default_head_search_ignores_is_warned_naming_the_mode(tiny_data, tmp_path, caplog):
    config = tiny_config(tmp_path / "run", tiny_data, "eval.every_steps=7", "train.decay_rate=0.5")
    stop = StopFlag()
    stop.signal_name = "SIGTERM"  # the warning comes first; nothing needs to train for it
    with caplog.at_level(logging.WARNING, logger="runner"):
        _job(config, RecordingSync(), stop).run()
    warned = [r.getMessage() for r in caplog.records if "no effect in this run" in r.getMessage()]
    assert any("eval.every_steps = 7" in w and "head.search = auto validates once per epoch" in w for w in warned)
    assert any("train.decay_rate = 0.5" in w for w in warned)


def test_a_fixed_head_follows_eval_every_steps(tiny_data, tmp_path):
    config = tiny_config(tmp_path / "run", tiny_data, "head.search=off", "eval.every_steps=8")
    assert isinstance(_job(config, RecordingSync()).run(), Finished)
    from runner.run.rundir import RunDir
    assert [r["step"] for r in RunDir(tmp_path / "run").metrics.read()] == [8, 16, 24, 32, 40]


@pytest.mark.parametrize("background", [True, False])
def test_the_tflite_backbone_is_converted_once_in_a_child_only_when_big_enough(tiny_data, tmp_path, monkeypatch,
                                                                              caplog, background):
    import runner.export.tflite as tflite_export
    if background:  # the tiny MobileNet stands in for a big backbone
        monkeypatch.setattr(tflite_export, "BACKGROUND_MIN_PARAMS", 0)
    config = tiny_config(tmp_path / "run", tiny_data, f"cache.dir={tmp_path / 'cache'}", "export.enabled=true",
                         "export.formats=tflite,labels", "train.steps=10")
    with caplog.at_level(logging.INFO, logger="runner"):
        assert isinstance(_job(config, RecordingSync()).run(), Finished)
    assert ("TFLite: converting the mobilenet backbone in the background" in caplog.text) == background
    assert ("TFLite: reusing the converted mobilenet backbone" in caplog.text) == background
    assert "background conversion failed" not in caplog.text
    assert len(list((tmp_path / "cache" / "tflite").glob("*.tflite"))) == 1
    assert (config.run_dir / "export" / "model.tflite").is_file()


def _job(config, sync, stop=None):
    from runner.job import Job
    return Job(config, sync, stop)

