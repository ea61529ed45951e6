"""TensorFlow's `checkpoint` state file, written as text without importing TensorFlow.

It is what `tf.train.latest_checkpoint(FOLDER)`, `tf.train.get_checkpoint_state` and
`tf.train.CheckpointManager` read to find the newest checkpoint of a folder. We write it for users and
their tools only: our own restore never reads it (the JSON markers are the source of truth).
"""
from __future__ import annotations

import json
from pathlib import Path

from common.files import write_text_atomic

STATE_FILE = "checkpoint"  # TensorFlow's fixed name


def state_text(prefixes: list[str]) -> str:
    """The text-format CheckpointState naming `prefixes` (oldest first, relative to the folder); the last is
    the newest."""
    if not prefixes:
        raise ValueError("a checkpoint state names at least one checkpoint")
    quoted = [json.dumps(p) for p in prefixes]  # ASCII names: JSON's quoting is the text format's
    return "".join([f"model_checkpoint_path: {quoted[-1]}\n"]
                   + [f"all_model_checkpoint_paths: {q}\n" for q in quoted])


def write_checkpoint_state(folder: Path, prefixes: list[str]) -> None:
    """Atomically write `folder`/checkpoint naming `prefixes` (oldest first); remove it when there are none."""
    path = Path(folder) / STATE_FILE
    if prefixes:
        write_text_atomic(path, state_text(prefixes))
    else:
        path.unlink(missing_ok=True)
