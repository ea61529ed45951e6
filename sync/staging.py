"""Local staging of finished checkpoints under RUN_DIR/.sync/staged: cheap copies taken synchronously."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sync.handover import HandOver

STAGED_INFO = "staged.json"


@dataclass
class Staged:
    """One staged checkpoint: its folder of file copies and the info recorded when it was staged."""
    path: Path
    info: dict

    @property
    def step(self) -> int:
        """The checkpoint's training step."""
        return int(self.info["step"])


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

    def stage(self, run_dir: Path, hand_over: HandOver, info: dict) -> Staged:
        """Hardlink the hand-over's immutable files and copy the others into a new staged folder."""
        step = hand_over.step
        stamp = time.time_ns()  # a step staged twice gets two folders: the worker may be sending the first
        final = self.root / f"step-{step:09d}-{stamp}"
        tmp = self.root / f".tmp-step-{step:09d}-{stamp}"
        try:
            for rel in hand_over.files:
                _link_or_copy(run_dir / rel, tmp / "files" / rel, rel in hand_over.immutable)
            info = dict(info, step=step, files=list(hand_over.files), staged=stamp / 1e9)
            (tmp / STAGED_INFO).write_text(json.dumps(info, sort_keys=True))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, final)
        return Staged(final, info)

    def pending(self) -> list[Staged]:
        """Complete staged checkpoints, oldest step first (half-written ones are ignored)."""
        out = []
        if self.root.is_dir():
            for path in sorted(self.root.glob("step-*")):
                try:
                    out.append(Staged(path, json.loads((path / STAGED_INFO).read_text())))
                except (OSError, ValueError):
                    continue
        return sorted(out, key=lambda s: (s.step, s.info.get("staged", 0)))

    def remove(self, staged: Staged) -> None:
        """Forget a staged checkpoint (sent, or superseded by a newer one)."""
        shutil.rmtree(staged.path, ignore_errors=True)

    def clean_partial(self) -> None:
        """Delete half-written staging folders left by a killed process."""
        if self.root.is_dir():
            for path in self.root.glob(".tmp-step-*"):
                shutil.rmtree(path, ignore_errors=True)
