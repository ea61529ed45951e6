"""RunDir, in process: the one owner of the run-dir layout, its metrics log and its snapshot file list."""
from __future__ import annotations

import json

import pytest

from runner.errors import RunnerError
from runner.run.records import CheckpointMarker, RunSteps
from runner.run.rundir import RunDir


def fake_checkpoint(run: RunDir, stage: str, local_step: int, step_offset: int = 0) -> None:
    """Files of a marked checkpoint, as CheckpointStore leaves them (no TensorFlow needed)."""
    checkpoints = run.stage(stage)
    checkpoints.dir.mkdir(parents=True, exist_ok=True)
    checkpoints.prefix(local_step).with_suffix(".index").write_bytes(b"i")
    checkpoints.prefix(local_step).with_name(f"{checkpoints.prefix(local_step).name}.data-00000-of-00001") \
        .write_bytes(b"d")
    checkpoints.write_marker(CheckpointMarker(stage=stage, step=local_step, steps=RunSteps(step_offset)))


def test_checkpoints_of_both_stages_are_listed_by_run_wide_step(tmp_path):
    run = RunDir(tmp_path)
    for step in (100, 200, 300):
        fake_checkpoint(run, "head", step)
    for step in (6, 12):
        fake_checkpoint(run, "finetune", step, step_offset=300)
    assert [(c.stage, c.local_step, c.step) for c in run.checkpoints()] == [
        ("finetune", 12, 312), ("finetune", 6, 306), ("head", 300, 300), ("head", 200, 200), ("head", 100, 100)]
    assert run.latest().step == 312 and run.stage("head").latest().step == 300
    assert run.checkpoint_at(306).stage == "finetune"
    with pytest.raises(RunnerError, match="available steps: 100, 200, 300, 306, 312"):
        run.checkpoint_at(5)


def test_a_fine_tune_checkpoint_at_the_head_s_last_step_counts_as_the_newer_one(tmp_path):
    run = RunDir(tmp_path)
    fake_checkpoint(run, "head", 300)
    fake_checkpoint(run, "finetune", 0, step_offset=300)
    assert run.latest().stage == "finetune"


def test_an_empty_run_dir_has_no_checkpoint_and_says_so(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.latest() is None
    with pytest.raises(RunnerError, match="holds no complete checkpoint"):
        run.checkpoint_at(None)


def test_retention_keeps_the_newest_and_deletes_whole_checkpoints(tmp_path):
    run = RunDir(tmp_path)
    for step in (100, 200, 300, 400):
        fake_checkpoint(run, "head", step)
    run.stage("head").prune(2)
    assert run.stage("head").steps() == [400, 300]
    assert not [p.name for p in run.stage("head").dir.iterdir() if "-100." in p.name or "-200." in p.name]


def test_the_hand_over_lists_every_file_of_a_snapshot_with_its_immutable_flag(tmp_path):
    run = RunDir(tmp_path)
    fake_checkpoint(run, "head", 300)
    fake_checkpoint(run, "finetune", 12, step_offset=300)
    for path in (run.config, run.labels, run.head_record, run.summary, run.test_report):
        path.write_text("{}")
    run.metrics.append({"step": 312})
    (run.export / "variables").mkdir(parents=True)
    (run.export / "variables" / "v.data").write_bytes(b"x")
    files = run.hand_over(run.latest())
    assert files == {"finetune/checkpoints/ckpt-12.data-00000-of-00001": True,
                     "finetune/checkpoints/ckpt-12.index": True, "finetune/checkpoints/ckpt-12.json": True,
                     "config.toml": True, "labels.json": True, "head_stage.json": True, "metrics.jsonl": False}
    final = run.hand_over(run.latest(), final=True)
    assert set(final) - set(files) == {"summary.json", "test_report.json", "export/variables/v.data"}


def test_a_torn_last_metrics_line_is_dropped_and_the_log_goes_on(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.metrics.append({"step": 100})
    run.metrics.append({"step": 200})
    with open(run.metrics.path, "a") as f:
        f.write('{"step": 300, "val_acc')  # killed mid-write
    assert [r["step"] for r in run.metrics.read()] == [100, 200]
    run.metrics.append({"step": 300})
    assert [json.loads(line)["step"] for line in run.metrics.path.read_text().splitlines()] == [100, 200, 300]


def test_trim_drops_lines_after_the_restored_step_and_a_torn_tail(tmp_path):
    run = RunDir(tmp_path)
    for step in (100, 200, 300):
        run.metrics.append({"step": step})
    with open(run.metrics.path, "a") as f:
        f.write('{"st')
    run.metrics.trim(200)
    assert run.metrics.path.read_text() == '{"step": 100}\n{"step": 200}\n'


def test_a_bad_line_before_the_last_names_the_file_and_line(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunnerError, match=r"metrics.jsonl line 2 is not JSON"):
        run.metrics.read()
