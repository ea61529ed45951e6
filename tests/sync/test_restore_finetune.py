"""A fine-tuning run whose disk is lost finishes from its snapshot, and a finished run started again
changes nothing: with the folder backend and with the Drive backend (the HTTPS fake)."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.helpers import CLOTHING, OutputWatcher, local_mobilenet_args, run_resume, start_resume, summary

pytestmark = pytest.mark.slow

HEAD_SAVED = re.compile(r"checkpoint saved at head step (\d+)")
UPLOADED = re.compile(r"snapshot step (\d+) uploaded and verified")
FINETUNE = ("train.steps=60", "fine_tune.eval_every_steps=30", "checkpoint.every_steps=6", "fine_tune.enabled=true",
            "fine_tune.steps=24", "fine_tune.batch_size=8", "fine_tune.fraction=0.1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three classes of 16 real photos each: enough to train and fine-tune in seconds."""
    root = tmp_path_factory.mktemp("photos")
    for name in ("hat", "pants", "shoes"):
        (root / name).mkdir()
        for src in sorted((CLOTHING / name).glob("*.jpg"))[:16]:
            shutil.copy(src, root / name / src.name)
    return root


def sync_settings(backend: str, request, tmp_path) -> list[str]:
    if backend == "folder":
        return [f"sync.folder={tmp_path / 'remote'}"]
    drive = request.getfixturevalue("drive_config")
    return [f"sync.{k}={getattr(drive, k)}" for k in
            ("backend", "folder", "credentials", "api_endpoint", "ca_certs", "chunk_mib")]


def kill_once_a_fine_tune_snapshot_is_uploaded(args: list[str]) -> None:
    """SIGKILL resume.py as soon as sync says a snapshot of a fine-tuning step is on the remote (uploads run
    in the background, so a checkpoint line alone does not mean the remote has it)."""
    process = start_resume(*args)
    watcher = OutputWatcher(process)

    def fine_tune_snapshot_sent(line: str) -> bool:
        head = [int(m.group(1)) for m in map(HEAD_SAVED.search, list(watcher.lines)) if m]
        sent = UPLOADED.search(line)
        return bool(head and sent and int(sent.group(1)) > max(head))
    assert watcher.wait_until(fine_tune_snapshot_sent, timeout=300), watcher.output()
    process.kill()
    process.wait()
    watcher.output()


@pytest.mark.parametrize("backend", ["folder", "drive"])
def test_fine_tuning_restored_on_a_new_disk_finishes_and_a_finished_run_changes_nothing(
        backend, photos, request, tmp_path):
    run_dir = tmp_path / "vm" / "run"  # the cache is RUN_DIR/cache: it goes with the disk too
    args = local_mobilenet_args(run_dir, None, *FINETUNE, *sync_settings(backend, request, tmp_path),
                                data_dir=photos, export=True)
    kill_once_a_fine_tune_snapshot_is_uploaded(args)
    shutil.rmtree(tmp_path / "vm")  # a brand-new VM: nothing local survives

    restored = run_resume(*args)
    assert restored.returncode == 0, restored.stdout
    assert "downloaded the snapshot of step" in restored.stdout
    assert "resumed from fine-tuning step" in restored.stdout and "vectors computed now" in restored.stdout
    first = summary(run_dir)
    final_step = first["head_steps"] + 24  # the head search may stop before its 60 steps; fine-tuning runs 24
    assert first["stage"] == "finetune" and first["global_step"] == final_step and first["finetune_steps"] == 24
    assert first["head_only_test_accuracy"] is not None
    assert json.loads((run_dir / "export" / "model.json").read_text())["step"] == final_step

    def results():  # every file of the run but sync's queue, the cache (its scan index is data.py's), the lock
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
                if p.is_file() and not {".sync", "cache", ".lock"} & set(p.relative_to(run_dir).parts)}
    before = results()
    again = run_resume(*args)
    assert again.returncode == 0, again.stdout
    assert f"already finished, nothing changed: step {final_step}," in again.stdout
    assert "downloaded the snapshot" not in again.stdout and "resumed from" not in again.stdout
    after = results()
    changed = sorted(str(p.relative_to(run_dir)) for p in after if before.get(p) != after[p])
    assert changed == [], f"a finished run started again wrote {changed}"
    assert summary(run_dir)["resumed_from"] == first["resumed_from"]
    assert "uploaded" not in again.stdout
