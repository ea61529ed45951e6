"""Atomic checkpoints of one stage: tf.train.Checkpoint for the variables, plus a JSON marker each.

A checkpoint counts only once its marker exists: the marker is written (atomically) after TensorFlow
has finished writing, and records the sha256 of every file, the compatibility fingerprint, the label
map and the resume history. Restore takes the newest checkpoint whose files verify and load, falling
back to older ones and saying so. TensorFlow's `checkpoint` state file is kept beside them for
tf.train.latest_checkpoint, never read here. File names come from RunDir (runner/run/rundir.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import tensorflow as tf

from common.files import file_digest
from runner.run.records import CheckpointMarker
from runner.run.rundir import CheckpointRef, StageCheckpoints

log = logging.getLogger("runner")


class CheckpointStore:
    """Save, verify and restore the checkpoints of one stage; keeps the newest `keep`."""

    def __init__(self, stage: StageCheckpoints, checkpoint: tf.train.Checkpoint, keep: int):
        self.stage, self.checkpoint, self.keep = stage, checkpoint, keep
        self.dir = stage.dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seconds_saving = 0.0  # time spent in save(), all saves together (what checkpointing costs)

    def save(self, local_step: int, marker: CheckpointMarker) -> CheckpointRef:
        """Write a checkpoint and, last, its marker; prune older ones; return the new checkpoint."""
        began = time.perf_counter()
        self.checkpoint.write(str(self.stage.prefix(local_step)))
        files = {p.name: file_digest(p) for p in self.stage.data_files(local_step)}
        marker = dataclasses.replace(marker, step=local_step, saved_at=time.time(), files=files)
        self.stage.write_marker(marker)
        self.stage.write_state(self.keep)  # TensorFlow's state file: after the marker, naming only survivors
        self.stage.prune(self.keep)
        self.seconds_saving += time.perf_counter() - began
        return self.stage.ref(marker)

    def _verify(self, marker: CheckpointMarker) -> str | None:
        if not marker.files:
            return "its marker lists no files"
        for name, digest in marker.files.items():
            path = self.dir / name
            if not path.exists():
                return f"{name} is missing"
            if file_digest(path) != digest:
                return f"{name} does not match its recorded sha256 (corrupt or half-written)"
        return None

    def restore(self) -> CheckpointRef | None:
        """Load the newest usable checkpoint into the tracked objects; None if there is none."""
        skipped = []
        for local_step in self.stage.steps():
            try:
                ref = self.stage.ref(self.stage.read_marker(local_step))
            except (OSError, ValueError, TypeError) as e:
                skipped.append(f"step {local_step}: marker unreadable ({e})")
                continue
            problem = self._verify(ref.marker)
            if problem is None:
                try:
                    self.checkpoint.read(str(ref.prefix)).assert_existing_objects_matched()
                except (tf.errors.OpError, ValueError, AssertionError) as e:
                    problem = f"TensorFlow could not load it ({type(e).__name__})"
            if problem is None:
                for note in skipped:
                    log.warning("checkpoint %s: skipped; fell back to step %d", note, local_step)
                return ref
            skipped.append(f"step {local_step}: {problem}")
        for note in skipped:
            log.warning("checkpoint %s: skipped", note)
        return None
