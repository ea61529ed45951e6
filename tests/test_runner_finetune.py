"""The fine-tuning stage: own checkpoints, exact resume after SIGKILL, and no loss of accuracy."""
from __future__ import annotations

import json

import pytest

from tests.helpers import (assert_same_checkpoint, checkpoint_values, latest_checkpoint_prefix, local_mobilenet_args,
                           random_steps, run_resume, sigkill_after_checkpoints, summary)

pytestmark = pytest.mark.slow

FINETUNE = ("train.steps=300", "train.deterministic=true", "fine_tune.enabled=true", "fine_tune.steps=24",
            "fine_tune.batch_size=16", "fine_tune.fraction=0.15", "checkpoint.every_steps=6",
            "fine_tune.eval_every_steps=12", "head.dropout=0.2")


def finetune_prefix(run_dir) -> str:
    markers = sorted((run_dir / "finetune" / "checkpoints").glob("ckpt-*.json"),
                     key=lambda p: int(p.stem.split("-")[1]))
    return str(markers[-1].with_suffix(""))


def test_fine_tuning_killed_at_random_steps_resumes_to_identical_weights(clothing_run, tmp_path):
    _, cache_dir, _ = clothing_run
    unbroken = tmp_path / "unbroken"
    result = run_resume(*local_mobilenet_args(unbroken, cache_dir, *FINETUNE))
    assert result.returncode == 0, result.stdout
    s = summary(unbroken)
    assert s["stage"] == "finetune" and s["global_step"] == 324
    assert s["test_accuracy"] >= s["head_only_test_accuracy"] - 0.03
    stages = [json.loads(x)["stage"] for x in (unbroken / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = -(-s["num_train"] // 100)  # the head search validates once per epoch
    assert stages.count("head") == -(-300 // steps_per_epoch) and stages.count("finetune") == 2

    broken = tmp_path / "broken"
    args = local_mobilenet_args(broken, cache_dir, *FINETUNE)
    sigkill_after_checkpoints(args, "finetune", random_steps(6, 24, count=2, seed=7))
    result = run_resume(*args)
    assert result.returncode == 0, result.stdout
    assert "resumed from fine-tuning step" in result.stdout
    head_only = checkpoint_values(latest_checkpoint_prefix(unbroken))
    fine_tuned = checkpoint_values(finetune_prefix(unbroken))
    assert len(fine_tuned) > len(head_only) + 4, "backbone variables and their RMSProp slots are checkpointed"
    assert_same_checkpoint(finetune_prefix(unbroken), finetune_prefix(broken))
