"""What Sync.close() leaves behind, typed: is the newest checkpoint handed over on the remote, what is still
queued here, and the last error. resume.py, `python -m sync push` and the notebook read it (never its wording)."""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from common.files import write_text_atomic

OUTCOME_RECORD = "outcome.json"  # in RUN_DIR/.sync: the last close()'s outcome, for the notebook's status


@dataclass(frozen=True)
class SyncOutcome:
    """The state of sync when a process closes it.

    `on_remote`: the newest checkpoint handed over (`step`) is verified on the remote; `final`: that checkpoint
    is the run's final one (results and export inside); `pending`: snapshots still staged on this machine;
    `local`: where the newest of them (or the run itself) is on this machine; `message`: one line for people."""
    enabled: bool
    message: str
    remote: str = ""
    step: int | None = None
    final: bool = False
    on_remote: bool = False
    pending: int = 0
    local: str = ""
    last_error: str | None = None

    @property
    def final_on_remote(self) -> bool:
        """The run's final snapshot is verified on the remote."""
        return self.enabled and self.final and self.on_remote

    def __str__(self) -> str:
        return self.message

    def save(self, path: Path) -> None:
        """Record this outcome (RUN_DIR/.sync/outcome.json) for whoever looks at the run later."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "SyncOutcome | None":
        """The recorded outcome, or None when there is none (or it is unreadable: it is only a report)."""
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


def push_command(config_file: Path) -> str:
    """The exact command that sends the newest checkpoint of the run whose resolved settings are config_file."""
    return f"python -m sync --config {shlex.quote(str(config_file))} push"


def not_on_remote_message(outcome: SyncOutcome, run_dir: Path, config_file: Path, model_dir: Path | None) -> str:
    """What to tell a user whose run finished but whose final snapshot is not on the remote (exit status 75);
    `model_dir`: the run's exported model, where it has one (the runner names it: sync knows no run-dir names)."""
    what = f"the final snapshot (step {outcome.step})" if outcome.step is not None else "no snapshot"
    reason = (outcome.last_error or "not sent")
    model = f"the trained model is on this machine only, in {model_dir}" if model_dir is not None else \
        f"the trained run is on this machine only, in {run_dir}"
    return (f"{what} is not in {outcome.remote} ({reason}); {model}"
            + (f" (queued for upload in {outcome.local})" if outcome.pending else "")
            + f". Fix the cause, then push it before this machine goes away: {push_command(config_file)}"
            f" (or run the same command again: it sends what is queued).")
