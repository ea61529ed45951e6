"""The typed hand-over: what the runner gives sync after each finished checkpoint (and sync keeps)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.files import write_text_atomic
from sync.errors import SyncError
from sync.snapshot import check_relpath


@dataclass(frozen=True)
class HandOver:
    """One finished checkpoint as sync sees it: files relative to the run dir (those in `immutable` are
    never changed in place, so a hard link is a safe copy), relative cache files, the run-wide step and
    the validation metrics of that step."""
    step: int
    files: tuple[str, ...]
    immutable: frozenset[str]
    runner_version: str
    metrics: dict = field(default_factory=dict)   # val_accuracy, val_loss, ... (JSON numbers/strings)
    cache_files: tuple[str, ...] = ()
    final: bool = False                           # the run's last snapshot (results and export inside)
    published: tuple[str, ...] = ()               # of `files`, those also stored as plain files beside the
                                                  # snapshots (the final export and report, readable on Drive)

    def __post_init__(self):
        if not self.runner_version:
            raise ValueError("HandOver.runner_version must name the runner's version")
        object.__setattr__(self, "files", tuple(sorted({check_relpath(f) for f in self.files})))
        object.__setattr__(self, "immutable", frozenset(self.immutable))
        object.__setattr__(self, "cache_files", tuple(sorted({check_relpath(f) for f in self.cache_files})))
        object.__setattr__(self, "metrics", _jsonable(self.metrics))
        object.__setattr__(self, "published", tuple(sorted({check_relpath(f) for f in self.published})))
        if not self.immutable <= set(self.files):
            raise ValueError(f"HandOver.immutable names files not handed over: {sorted(self.immutable - set(self.files))}")
        if not set(self.published) <= set(self.files):
            raise ValueError(f"HandOver.published names files not handed over: "
                             f"{sorted(set(self.published) - set(self.files))}")

    @property
    def val_accuracy(self) -> float | None:
        """The validation accuracy of the step, if it was measured."""
        return self.metrics.get("val_accuracy")

    def to_json(self) -> str:
        """The hand-over as JSON (sync's own record of it)."""
        data = asdict(self)
        data.update(files=list(self.files), immutable=sorted(self.immutable), cache_files=list(self.cache_files),
                    published=list(self.published))
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HandOver":
        """Read back what to_json wrote."""
        data = json.loads(text)
        return cls(**dict(data, files=tuple(data["files"]), immutable=frozenset(data["immutable"]),
                          cache_files=tuple(data["cache_files"]), published=tuple(data.get("published", ()))))


def save_record(path: Path, hand_over: HandOver) -> None:
    """Persist the last hand-over (for `python -m sync push`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, hand_over.to_json())


def load_record(path: Path) -> HandOver | None:
    """The last persisted hand-over, or None when there is none; SyncError naming it when it is unreadable."""
    try:
        return HandOver.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise SyncError(f"{path} is unreadable ({e}); delete it, a new checkpoint rewrites it.") from None


def _jsonable(metrics: dict) -> dict:
    """Metrics reduced to finite JSON numbers, strings, booleans and None."""
    out = {}
    for key, value in dict(metrics).items():
        if value is None or isinstance(value, (bool, str)):
            out[str(key)] = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                out[str(key)] = str(value)
                continue
            out[str(key)] = (int(value) if isinstance(value, int) else number) if math.isfinite(number) else None
    return out
