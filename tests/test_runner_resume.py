"""Kill at any moment, start again with the same command: nothing lost, nothing different."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import (assert_same_checkpoint, latest_checkpoint_prefix, local_mobilenet_args, random_steps,
                           run_resume, sigkill_after_checkpoints, sigkill_once_shards, sigterm_after_start, summary)

pytestmark = pytest.mark.slow

HEAD_SETTINGS = ("train.steps=600", "checkpoint.every_steps=100", "eval.every_steps=100",
                 "head.hidden_units=128", "head.dropout=0.3", "train.label_smoothing=0.1",
                 "train.class_weights=balanced")


def test_sigkill_at_random_steps_then_resume_ends_with_identical_weights(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    unbroken = tmp_path / "unbroken"
    result = run_resume(*local_mobilenet_args(unbroken, cache_dir, *HEAD_SETTINGS))
    assert result.returncode == 0, result.stdout

    broken = tmp_path / "broken"
    args = local_mobilenet_args(broken, cache_dir, *HEAD_SETTINGS)
    sigkill_after_checkpoints(args, "head", random_steps(100, 500, count=3, seed=1234))  # early: a search may stop
    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    assert "resumed from step" in result.stdout
    assert summary(broken)["resumed_from"], "the run should have resumed at least once"
    assert_same_checkpoint(latest_checkpoint_prefix(unbroken), latest_checkpoint_prefix(broken))
    assert summary(broken)["test_accuracy"] == summary(unbroken)["test_accuracy"]


def test_kill_during_extraction_resumes_without_recomputing(shared_assets, tmp_path):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    args = local_mobilenet_args(run_dir, cache_dir, "cache.shard_size=64", "cache.batch_size=16",
                                "train.steps=20", "eval.every_steps=10")
    shards_before = sigkill_once_shards(args, cache_dir, 3)
    assert shards_before >= 3

    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    line = next(x for x in result.stdout.splitlines() if "extracting bottlenecks for" in x)
    todo = int(line.split("for ")[1].split(" images")[0])
    cached = int(line.split("(")[1].split(" already")[0])
    assert cached == 64 * shards_before and todo + cached == 1885
    from runner.features.cache import BottleneckCache
    import json
    identity = json.loads(next(cache_dir.glob("*/identity.json")).read_text())
    cache = BottleneckCache(cache_dir, {k: v for k, v in identity.items() if k != "dim"}, identity["dim"])
    assert len(cache) == 1885


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    run_dir = tmp_path / "run"
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, "train.steps=300",
                                              "checkpoint.every_steps=100"))
    assert result.returncode == 0, result.stdout
    data_file = next((run_dir / "checkpoints").glob("ckpt-300.data-*"))
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))

    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, "train.steps=400",
                                              "checkpoint.every_steps=100"))
    assert result.returncode == 0, result.stdout
    assert "step 300" in result.stdout and "fell back to step 200" in result.stdout
    assert "resumed from step 200" in result.stdout
    assert summary(run_dir)["global_step"] == 400 and summary(run_dir)["resumed_from"] == [200]


def test_another_backbone_size_is_refused_and_other_classes_start_a_new_data_version(clothing_run, tmp_path):
    run_dir, cache_dir, _ = clothing_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = run_resume(*local_mobilenet_args(copy, cache_dir, "backbone.image_size=192"))
    assert result.returncode == 2, result.stdout
    assert "image_size: 224 → 192" in result.stdout and "--set run.dir=" in result.stdout
    assert "Traceback" not in result.stdout

    fewer = tmp_path / "fewer"
    from tests.helpers import CLOTHING
    for name in ("dress", "hat", "pants"):
        shutil.copytree(CLOTHING / name, fewer / name)
    cache_copy = shutil.copytree(cache_dir, tmp_path / "cache")
    result = run_resume(*local_mobilenet_args(copy, cache_copy, data_dir=fewer))
    assert result.returncode == 0, result.stdout
    assert "7 removed ('longsleeve'" in result.stdout and "Starting data version 2" in result.stdout
    assert "0 vectors computed now" in result.stdout, "every photo of the 3 classes is cached"
    assert len(list((copy / "versions" / "v1" / "checkpoints").glob("ckpt-*.json"))) == 3, "nothing is deleted"
    assert json.loads((copy / "summary.json").read_text())["num_classes"] == 3


def test_sigterm_saves_a_final_checkpoint_and_the_same_command_continues(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    run_dir = tmp_path / "run"
    args = local_mobilenet_args(run_dir, cache_dir, "train.steps=100000", "checkpoint.every_steps=0",
                                "checkpoint.every_seconds=3600", "head.hidden_units=256", "head.search=off")
    code, output = sigterm_after_start(args, "training head: 1/")  # SIGTERM once a step has been taken
    assert code == 130
    assert "stopped by SIGTERM at step" in output and "checkpoint saved" in output
    step = int(output.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert step > 0 and (run_dir / "checkpoints" / f"ckpt-{step}.json").exists()
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, f"train.steps={step + 50}",
                                              "head.hidden_units=256", "head.search=off"))
    assert result.returncode == 0, result.stdout
    assert f"resumed from step {step}," in result.stdout
