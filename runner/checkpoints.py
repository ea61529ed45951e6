"""Atomic checkpoints: tf.train.CheckpointManager for the variables, plus a JSON marker per checkpoint.

A checkpoint counts only once its marker `ckpt-STEP.json` exists: the marker is written (atomically)
after TensorFlow has finished writing, and records the sha256 of every file, the compatibility
fingerprint, the label map and the resume history. Restore takes the newest checkpoint whose files
verify and load, falling back to older ones and saying so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from common.files import write_text_atomic

log = logging.getLogger("runner")

PREFIX = "ckpt"
HEAD_CHECKPOINTS = "checkpoints"                 # folders inside a run dir
FINETUNE_CHECKPOINTS = "finetune/checkpoints"
MARKER = re.compile(rf"^{PREFIX}-(\d+)\.json$")


@dataclass
class Restored:
    """What restore() found: the step, its marker, and how many newer checkpoints were unusable."""
    step: int
    marker: dict
    skipped: list[str]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def marked_steps(directory: Path) -> list[int]:
    """Steps of complete (marked) checkpoints in a folder, newest first."""
    if not Path(directory).is_dir():
        return []
    found = [int(m.group(1)) for p in Path(directory).iterdir() if (m := MARKER.match(p.name))]
    return sorted(found, reverse=True)


def latest_marker(directory: Path) -> dict | None:
    """The newest readable checkpoint marker in a folder, without loading any variables."""
    for step in marked_steps(directory):
        try:
            return json.loads((Path(directory) / f"{PREFIX}-{step}.json").read_text())
        except (OSError, ValueError):
            continue
    return None


class CheckpointStore:
    """Save, list, verify and restore the checkpoints in one folder."""

    def __init__(self, directory: Path, checkpoint: tf.train.Checkpoint, max_to_keep: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint = checkpoint
        self.max_to_keep = max_to_keep
        self.manager = tf.train.CheckpointManager(checkpoint, str(self.dir), max_to_keep=max_to_keep,
                                                  checkpoint_name=PREFIX)

    def steps(self) -> list[int]:
        """Steps of complete (marked) checkpoints, newest first."""
        return marked_steps(self.dir)

    def marker(self, step: int) -> dict:
        return json.loads((self.dir / f"{PREFIX}-{step}.json").read_text())

    def _data_files(self, step: int) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{PREFIX}-{step}.*") if p.suffix != ".json")

    def save(self, step: int, marker: dict) -> list[str]:
        """Write a checkpoint and its marker; return its files relative to the checkpoint folder."""
        self.manager.save(checkpoint_number=step)
        files = {p.name: _sha256(p) for p in self._data_files(step)}
        marker = dict(marker, step=step, saved_at=time.time(), files=files)
        marker_path = self.dir / f"{PREFIX}-{step}.json"
        write_text_atomic(marker_path, json.dumps(marker, indent=1, sort_keys=True))
        self._prune()
        return sorted(files) + [marker_path.name]

    def _prune(self) -> None:
        for step in self.steps()[self.max_to_keep:]:
            (self.dir / f"{PREFIX}-{step}.json").unlink(missing_ok=True)
            for path in self._data_files(step):
                path.unlink(missing_ok=True)

    def _verify(self, step: int, marker: dict) -> str | None:
        for name, digest in marker.get("files", {}).items():
            path = self.dir / name
            if not path.exists():
                return f"{name} is missing"
            if _sha256(path) != digest:
                return f"{name} does not match its recorded sha256 (corrupt or half-written)"
        if not marker.get("files"):
            return "its marker lists no files"
        return None

    def restore(self) -> Restored | None:
        """Load the newest usable checkpoint into the tracked objects; None if there is none."""
        skipped = []
        for step in self.steps():
            try:
                marker = self.marker(step)
            except (OSError, ValueError) as e:
                skipped.append(f"step {step}: marker unreadable ({e})")
                continue
            problem = self._verify(step, marker)
            if problem is None:
                try:
                    self.checkpoint.read(str(self.dir / f"{PREFIX}-{step}")).assert_existing_objects_matched()
                except (tf.errors.OpError, ValueError, AssertionError) as e:
                    problem = f"TensorFlow could not load it ({type(e).__name__})"
            if problem is None:
                for note in skipped:
                    log.warning("checkpoint %s: skipped; fell back to step %d", note, step)
                return Restored(step, marker, skipped)
            skipped.append(f"step {step}: {problem}")
        for note in skipped:
            log.warning("checkpoint %s: skipped", note)
        return None
