"""A run directory written by the runner before its records were typed (tests/fixtures/run_v0_1_0, made by
commit 537aab1) still reads, resumes bit-identically, exports, and travels through sync."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import CLOTHING, SHARED, assert_same_checkpoint, local_mobilenet_args, run_resume, summary

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1_0"
SETTINGS = ("split.validation_percent=25", "split.test_percent=25", "train.steps=40", "checkpoint.every_steps=10",
            "train.batch_size=8")
TEXT_SUFFIXES = {".json", ".jsonl", ".toml"}


def install_fixture(root: Path) -> tuple[Path, Path, list[str]]:
    """The fixture's run directory and photos under `root`, its recorded paths pointing there: (run dir,
    data dir, the resume.py arguments it was made with)."""
    data, run_dir = root / "data", root / "run"
    for name in ("hat", "pants", "shoes"):
        (data / name).mkdir(parents=True)
        for src in sorted((CLOTHING / name).glob("*.jpg"))[:16]:
            shutil.copy(src, data / name / src.name)
    shutil.copytree(FIXTURE, run_dir, ignore=shutil.ignore_patterns("README.md"))
    places = {"@DATA@": str(data), "@RUN@": str(run_dir), "@REMOTE@": str(root / "remote"), "@SHARED@": str(SHARED)}
    for path in run_dir.rglob("*"):
        if path.suffix in TEXT_SUFFIXES or path.name == "checkpoint":
            text = path.read_text(encoding="utf-8")
            for placeholder, real in places.items():
                text = text.replace(placeholder, real)
            path.write_text(text, encoding="utf-8")
    args = local_mobilenet_args(run_dir, run_dir / "cache", *SETTINGS, data_dir=data)
    return run_dir, data, args


def test_the_old_markers_and_records_read_as_typed_records(tmp_path):
    from runner.run.records import CheckpointMarker
    from runner.run.results import HeadRecord, Summary
    from runner.run.rundir import RunDir
    run_dir, _, _ = install_fixture(tmp_path)
    run = RunDir(run_dir)
    latest = run.latest()
    assert (latest.stage, latest.step, latest.local_step) == ("head", 40, 40)
    marker = latest.marker
    assert isinstance(marker, CheckpointMarker)
    assert marker.classes == ("hat", "pants", "shoes") and marker.backbone.feature_dim == 256
    assert marker.evaluation.val_accuracy == 0.9375 and marker.evaluation.step == 40
    assert marker.data.images == 48 and marker.data_version == 1 and marker.steps.offset == 0
    old = json.loads((run_dir / "checkpoints" / "ckpt-40.json").read_text(encoding="utf-8"))
    assert marker.to_json() == old, "a marker read and written again keeps every field it had"
    assert run.read_summary() == Summary.from_json(summary(run_dir)) and run.read_summary().global_step == 40
    assert isinstance(run.read_head_record(), HeadRecord) and run.read_test_report().accuracy == 0.75


def test_a_finished_old_run_started_again_trains_nothing_and_exports(tmp_path):
    run_dir, _, args = install_fixture(tmp_path)
    checkpoints = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    old_summary = summary(run_dir)
    first = run_resume(*args)  # may complete what this version records and the old one did not (report.json)
    assert first.returncode == 0 and "resumed from" not in first.stdout, first.stdout
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == checkpoints
    assert {k: summary(run_dir)[k] for k in old_summary} == old_summary, "the same results, nothing retrained"
    second = run_resume(*args)
    assert second.returncode == 0, second.stdout
    assert "already finished, nothing changed: step 40," in second.stdout, second.stdout
    from runner.export.exporter import export_run
    from runner.export.classify import ExportedModel
    export = export_run(run_dir, formats="saved_model,labels")
    model = ExportedModel(export)
    assert model.classes == ["hat", "pants", "shoes"]
    photo = sorted((CLOTHING / "pants").glob("*.jpg"))[0]
    assert model.probabilities(photo.read_bytes()).shape == (3,)


def test_an_old_run_killed_after_step_30_resumes_to_the_same_bits(tmp_path):
    run_dir, _, args = install_fixture(tmp_path)
    kept = run_dir.parent / "ckpt-40"
    kept.mkdir()
    for path in (run_dir / "checkpoints").glob("ckpt-40.*"):
        path.replace(kept / path.name)
    for name in ("summary.json", "test_report.json", "head_stage.json"):
        (run_dir / name).unlink()
    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    assert "resumed from step 30" in result.stdout, result.stdout
    assert_same_checkpoint(str(kept / "ckpt-40"), str(run_dir / "checkpoints" / "ckpt-40"))
    assert summary(run_dir)["global_step"] == 40 and summary(run_dir)["resumed_from"] == [30]


def test_an_old_run_resumed_with_sync_on_restores_on_a_new_disk(tmp_path):
    run_dir, data, args = install_fixture(tmp_path)
    for path in (run_dir / "checkpoints").glob("ckpt-40.*"):
        path.unlink()
    sync_args = ["--set", "sync.backend=folder", "--set", f"sync.folder={tmp_path / 'remote'}"]
    first = run_resume(*args, *sync_args)
    assert first.returncode == 0 and "resumed from step 30" in first.stdout, first.stdout
    new_disk = tmp_path / "new-disk" / "run"  # the same run, by name, on another machine
    result = run_resume(*local_mobilenet_args(new_disk, None, *SETTINGS, data_dir=data), *sync_args)
    assert result.returncode == 0, result.stdout
    assert "downloaded the snapshot of step 40" in result.stdout, result.stdout
    assert_same_checkpoint(str(run_dir / "checkpoints" / "ckpt-40"), str(new_disk / "checkpoints" / "ckpt-40"))
    assert summary(new_disk)["global_step"] == 40 and summary(new_disk)["resumed_from"] == [30]
