"""Helpers for sync tests: a fake finished checkpoint in a run dir, like the runner leaves one."""
from __future__ import annotations

import json
import os
from pathlib import Path

from sync import HandOver

TRIES = 8  # sync.retries in drive tests: generous, so a loaded machine does not exhaust them
TIMEOUT_S = 1.0  # sync.timeout_s in drive tests: short, so stalls are detected quickly
STALL_S = TIMEOUT_S + 1.0  # a stalled response outlasts the client's timeout


def write_checkpoint(run_dir: Path, step: int, size: int = 4096, seed: int | None = None) -> list[str]:
    """Write the files of checkpoint `step` (random data) and the run files; return their relative paths."""
    rng = os.urandom if seed is None else (lambda n: bytes((seed + i) % 251 for i in range(n)))
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / f"ckpt-{step}.index").write_bytes(rng(64))
    (ck / f"ckpt-{step}.data-00000-of-00001").write_bytes(rng(size))
    (ck / f"ckpt-{step}.json").write_text(json.dumps({"step": step}))
    (run_dir / "labels.json").write_text(json.dumps(["daisy", "rose"]))
    (run_dir / "config.toml").write_text('[run]\ndir = "x"\n')
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step}) + "\n")
    files = [f"checkpoints/ckpt-{step}.index", f"checkpoints/ckpt-{step}.data-00000-of-00001",
             f"checkpoints/ckpt-{step}.json", "labels.json", "config.toml", "metrics.jsonl"]
    return files


def hand_over(step: int, files: list[str], acc: float | None = 0.5, cache_files=(), final: bool = False,
              published=()) -> HandOver:
    """The runner's hand-over of checkpoint `step`: everything but the metrics log is immutable."""
    return HandOver(step=step, files=tuple(files), immutable=frozenset(f for f in files if f != "metrics.jsonl"),
                    runner_version="test", metrics={"val_accuracy": acc, "val_loss": 1.0},
                    cache_files=tuple(cache_files), final=final, published=tuple(published))


def write_cache(cache_dir: Path, names: list[str], size: int = 2048) -> list[str]:
    """Write immutable cache shard files; return their paths relative to cache_dir."""
    out = []
    for name in names:
        path = cache_dir / "mobilenet_v2" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        out.append(f"mobilenet_v2/{name}")
    return out


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (except .sync/) as {relative path: content}."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".sync" not in p.relative_to(root).parts}
