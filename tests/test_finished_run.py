"""A finished run started again: read-only re-evaluation, and a lowered step count said and kept consistent;
a run that fails before it starts leaves no empty run directory behind."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import CLOTHING, REPO, local_mobilenet_args, run_resume, summary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_assets):
    """A head-only run of 60 steps on 3 classes of real photos, exported: (run_dir, its arguments)."""
    root = tmp_path_factory.mktemp("finished")
    photos = root / "photos"
    for name in ("hat", "pants", "shoes"):
        (photos / name).mkdir(parents=True)
        for src in sorted((CLOTHING / name).glob("*.jpg"))[:16]:
            shutil.copy(src, photos / name / src.name)
    run_dir = root / "run"
    args = local_mobilenet_args(run_dir, None, "eval.every_steps=20", "checkpoint.every_steps=20", data_dir=photos,
                                export=True)
    result = run_resume(*args, "--set", "train.steps=60")
    assert result.returncode == 0, result.stdout
    return run_dir, args, summary(run_dir)["global_step"]  # the head search may stop before 60


def run_files(run_dir):
    """Every result file of the run with its modification time (sync's queue, the cache and the lock aside)."""
    return {p.relative_to(run_dir).as_posix(): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and not {".sync", "cache", ".lock"} & set(p.relative_to(run_dir).parts)}


def test_a_finished_run_started_again_writes_nothing(finished_run):
    run_dir, args, step = finished_run
    before, lines = run_files(run_dir), (run_dir / "metrics.jsonl").read_text()
    result = run_resume(*args, "--set", "train.steps=60")
    assert result.returncode == 0, result.stdout
    assert f"already finished, nothing changed: step {step}," in result.stdout and "resumed from" not in result.stdout
    assert run_files(run_dir) == before, "no checkpoint, metrics line, summary or export may be rewritten"
    assert (run_dir / "metrics.jsonl").read_text() == lines and summary(run_dir)["resumed_from"] == []


def test_lowering_train_steps_on_a_finished_run_says_so_and_keeps_summary_and_export_consistent(finished_run):
    run_dir, args, step = finished_run
    lower = step // 2
    result = run_resume(*args, "--set", f"train.steps={lower}")
    assert result.returncode == 0, result.stdout
    assert f"(train.steps / train.epochs) = {lower} is below the step this stage already reached ({step})" \
        in result.stdout
    assert f"step {step}," in result.stdout and "n/a" not in result.stdout
    assert summary(run_dir)["global_step"] == step and summary(run_dir)["val_accuracy"] is not None
    assert json.loads((run_dir / "export" / "model.json").read_text())["step"] == step


def test_a_missing_export_of_a_finished_run_is_written_again(finished_run):
    run_dir, args, step = finished_run
    shutil.rmtree(run_dir / "export")
    result = run_resume(*args, "--set", "train.steps=60")
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("already finished, nothing changed") == 0
    assert json.loads((run_dir / "export" / "model.json").read_text())["step"] == step


def test_paths_in_a_config_file_follow_the_file_and_a_failed_start_leaves_no_run_dir(tmp_path):
    folder = tmp_path / "experiment"
    folder.mkdir()
    config = folder / "run.toml"
    config.write_text('[data]\ndir = "no-such-photos"\n[run]\ndir = "runs/x"\n')
    result = run_resume("--config", str(config))  # run from the repository, not from the config's folder
    assert result.returncode == 2, result.stdout
    assert f"data.dir {folder / 'no-such-photos'} is not a folder" in result.stdout
    assert not (folder / "runs").exists() and not (REPO / "runs" / "x").exists()


class Killed(BaseException):
    """A kill: nothing after it in the job runs."""


def test_a_report_left_at_an_older_step_by_a_kill_is_drawn_again_at_the_next_start(tmp_path, monkeypatch):
    import runner.job
    from runner.job import Job
    from runner.run.results import Finished
    from runner.run.rundir import RunDir
    from tests.helpers import write_synthetic_dataset
    from tests.test_job import RecordingSync, tiny_config
    data = write_synthetic_dataset(tmp_path / "data", num_classes=2, per_class=12, size=40)
    assert isinstance(Job(tiny_config(tmp_path / "run", data, "train.steps=20"), RecordingSync()).run(), Finished)
    run = RunDir(tmp_path / "run")
    drawn_at_20 = (run.report / "curves.png").stat().st_mtime_ns
    longer = tiny_config(run.path, data, "train.steps=40")
    kills = []

    def killed_while_drawing(run_dir):
        kills.append(run_dir)
        raise Killed
    monkeypatch.setattr(runner.job, "write_report", killed_while_drawing)
    with pytest.raises(Killed):
        Job(longer, RecordingSync()).run()
    assert len(kills) == 1 and summary(run.path)["global_step"] == 40, "killed after the results of step 40"
    monkeypatch.undo()

    outcome = Job(longer, RecordingSync()).run()
    assert isinstance(outcome, Finished), "the report of step 20 is not the finished run's report"
    assert run.report_step() == 40 and (run.report / "curves.png").stat().st_mtime_ns > drawn_at_20
