"""Local staging of finished checkpoints under RUN_DIR/.sync/staged: cheap copies taken synchronously."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from common.files import replace_atomic, write_text_atomic
from sync.handover import HandOver

STAGED_INFO = "staged.json"


@dataclass(frozen=True)
class Staged:
    """One staged checkpoint: its folder of file copies, the hand-over it copies, and when and for which run
    it was staged (`created`: when the runner handed it over; `staged`: the folder's own stamp, in seconds)."""
    path: Path
    hand_over: HandOver
    run_id: str
    created: float
    staged: float

    @property
    def step(self) -> int:
        """The checkpoint's training step."""
        return self.hand_over.step

    def to_json(self) -> str:
        """What staged.json holds."""
        return json.dumps({"hand_over": json.loads(self.hand_over.to_json()), "run_id": self.run_id,
                           "created": self.created, "staged": self.staged}, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> "Staged":
        """The staged checkpoint in folder path (ValueError/KeyError/TypeError when its record is unreadable)."""
        data = json.loads((path / STAGED_INFO).read_text(encoding="utf-8"))
        if "hand_over" not in data:  # staged by an earlier version: an untyped info dict
            data = {"hand_over": {"step": data["step"], "files": data["files"], "immutable": [],
                                  "runner_version": data.get("runner_version") or "unknown",
                                  "metrics": data.get("metrics") or {}, "cache_files": data.get("cache_files", [])},
                    "run_id": data.get("run_id", ""), "created": data["created"], "staged": data["staged"]}
        return cls(path, HandOver.from_json(json.dumps(data["hand_over"])), str(data["run_id"]),
                   float(data["created"]), float(data["staged"]))


def _link_or_copy(src: Path, dst: Path, immutable: bool) -> None:
    """A hard link for a file never changed in place (cheap at any size), a copy otherwise."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if immutable:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links unsupported: copy instead
    shutil.copyfile(src, dst)


class Staging:
    """The queue of staged checkpoints on disk; it survives a killed process."""

    def __init__(self, root: Path):
        self.root = root

    def stage(self, run_dir: Path, hand_over: HandOver, run_id: str, created: float) -> Staged:
        """Hardlink the hand-over's immutable files and copy the others into a new staged folder."""
        step = hand_over.step
        stamp = time.time_ns()  # a step staged twice gets two folders: the worker may be sending the first
        final = self.root / f"step-{step:09d}-{stamp}"
        tmp = self.root / f".tmp-step-{step:09d}-{stamp}"
        staged = Staged(final, hand_over, run_id, created, stamp / 1e9)
        try:
            tmp.mkdir(parents=True)
            for rel in hand_over.files:
                _link_or_copy(run_dir / rel, tmp / "files" / rel, rel in hand_over.immutable)
            write_text_atomic(tmp / STAGED_INFO, staged.to_json())
            replace_atomic(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return staged

    def pending(self) -> list[Staged]:
        """Complete staged checkpoints, oldest step first (half-written ones are ignored)."""
        out = []
        if self.root.is_dir():
            for path in sorted(self.root.glob("step-*")):
                try:
                    out.append(Staged.read(path))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return sorted(out, key=lambda s: (s.step, s.staged))

    def remove(self, staged: Staged) -> None:
        """Forget a staged checkpoint (sent, or superseded by a newer one)."""
        shutil.rmtree(staged.path, ignore_errors=True)

    def clean_partial(self) -> None:
        """Delete half-written staging folders left by a killed process."""
        if self.root.is_dir():
            for path in self.root.glob(".tmp-step-*"):
                shutil.rmtree(path, ignore_errors=True)
