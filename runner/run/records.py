"""The typed records a run keeps: its step bookkeeping, an evaluation, a checkpoint's marker, the test report.

Each record reads its JSON tolerantly (`from_json`: a missing key takes its default, a key this version does not
know is kept in `extra` and written back), so run directories written by earlier versions keep resuming and a
marker read and written again keeps every field it had. Only the run directory (runner/run/rundir.py) reads
and writes their files. No TensorFlow here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


def _known(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"extra"}


def _split(cls, data: Mapping | None, renames: Mapping[str, str] = {}) -> tuple[dict, dict]:
    """(the fields of `cls` present in data, under their field names; the keys cls does not know)."""
    data = dict(data or {})
    known, fields = _known(cls), {}
    for key in list(data):
        name = renames.get(key, key)
        if name in known:
            fields[name] = data.pop(key)
    return fields, data


@dataclass(frozen=True)
class RunSteps:
    """Where a stage's steps sit in the run: a stage counts its own steps from 0 (its checkpoints' file names);
    the run counts on across stages and data versions (metrics.jsonl, summary.json, snapshots). run-wide =
    offset + stage-local."""
    offset: int = 0

    def run_wide(self, stage_step: int) -> int:
        return self.offset + stage_step

    def stage_local(self, run_step: int) -> int:
        return run_step - self.offset


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a stage: a line of metrics.jsonl and a checkpoint marker's `metrics`."""
    step: int | None = None              # run-wide
    stage: str = ""
    stage_step: int | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    time: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")

    def validation(self) -> dict[str, float]:
        """The validation figures that were measured (none without a validation split)."""
        return {k: v for k, v in (("val_loss", self.val_loss), ("val_accuracy", self.val_accuracy)) if v is not None}

    def with_validation(self, val_loss: float | None, val_accuracy: float | None) -> "Evaluation":
        return dataclasses.replace(self, val_loss=val_loss, val_accuracy=val_accuracy)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return dict(self.extra, **data)

    @classmethod
    def from_json(cls, data: Mapping | None) -> "Evaluation | None":
        """None for an absent or empty record (a checkpoint saved before any evaluation)."""
        if not data:
            return None
        fields, extra = _split(cls, data)
        return cls(**fields, extra=extra)


@dataclass(frozen=True)
class BackboneInfo:
    """The backbone as markers, summary.json and the export describe it."""
    name: str = ""
    weights: str = ""
    image_size: int = 0
    alpha: float = 1.0
    feature_dim: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return dict(self.extra, **data)

    @classmethod
    def from_json(cls, data: Mapping | None) -> "BackboneInfo":
        fields, extra = _split(cls, data)
        return cls(**fields, extra=extra)


@dataclass(frozen=True)
class DataDigest:
    """What a checkpoint was trained on, besides its classes: the image count and a digest of (path, content)
    pairs and of (path, class, split) triples (runner/run/dataversion.py); None in markers written before each
    existed."""
    images: int | None = None
    digest: str | None = None
    assignment: str | None = None   # a digest of each image's class and split; None in markers written before it

    def to_json(self) -> dict:
        recorded = {"images": self.images, "digest": self.digest}
        return recorded if self.assignment is None else dict(recorded, assignment=self.assignment)


@dataclass(frozen=True)
class CheckpointMarker:
    """A checkpoint's JSON marker: it makes the checkpoint count, and says what it was made from."""
    stage: str = "head"
    step: int = 0                                     # stage-local (the checkpoint's file names)
    steps: RunSteps = RunSteps()                      # JSON: step_offset
    classes: tuple[str, ...] = ()
    backbone: BackboneInfo = BackboneInfo()
    data: DataDigest = DataDigest()
    data_version: int = 1
    fingerprint: Mapping[str, Any] = field(default_factory=dict)   # the settings a resume must keep
    evaluation: Evaluation | None = None              # JSON: metrics
    resumed_from: tuple[int, ...] = ()                # run-wide steps this run resumed from
    runner_version: str = ""
    saved_at: float | None = None
    files: Mapping[str, str] = field(default_factory=dict)         # file name → sha256
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_step(self) -> int:
        return self.steps.run_wide(self.step)

    def to_json(self) -> dict:
        data = {"stage": self.stage, "step": self.step, "step_offset": self.steps.offset,
                "classes": list(self.classes), "backbone": self.backbone.to_json(), "data": self.data.to_json(),
                "data_version": self.data_version, "fingerprint": dict(self.fingerprint),
                "metrics": self.evaluation.to_json() if self.evaluation else {},
                "resumed_from": list(self.resumed_from), "runner_version": self.runner_version,
                "saved_at": self.saved_at, "files": dict(self.files)}
        return dict(self.extra, **data)

    @classmethod
    def from_json(cls, data: Mapping) -> "CheckpointMarker":
        """ValueError when it is not a marker at all (not an object, or without a step)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("step"), int):
            raise ValueError("not a checkpoint marker (no step)")
        fields, extra = _split(cls, data, {"step_offset": "steps", "metrics": "evaluation"})
        fields["steps"] = RunSteps(int(fields.get("steps", 0)))
        fields["evaluation"] = Evaluation.from_json(fields.get("evaluation"))
        fields["backbone"] = BackboneInfo.from_json(fields.get("backbone"))
        digest = fields.get("data") or {}
        fields["data"] = DataDigest(digest.get("images"), digest.get("digest"), digest.get("assignment"))
        for name in ("classes", "resumed_from"):
            fields[name] = tuple(fields.get(name) or ())
        return cls(**fields, extra=extra)


@dataclass(frozen=True)
class TestReport:
    """test_report.json: the test split's loss and accuracy, per-class accuracy, sparse confusion, mistakes."""
    loss: float | None = None                         # JSON: test_loss
    accuracy: float | None = None                     # JSON: test_accuracy
    per_class_accuracy: Mapping[str, float | None] = field(default_factory=dict)
    confusion_matrix: Mapping[str, Any] = field(default_factory=dict)
    misclassified: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    _RENAMES = {"test_loss": "loss", "test_accuracy": "accuracy"}

    def to_json(self) -> dict:
        data = {"test_loss": self.loss, "test_accuracy": self.accuracy,
                "per_class_accuracy": dict(self.per_class_accuracy), "confusion_matrix": dict(self.confusion_matrix),
                "misclassified": [dict(m) for m in self.misclassified]}
        return dict(self.extra, **data)

    @classmethod
    def from_json(cls, data: Mapping | None) -> "TestReport":
        fields, extra = _split(cls, data, cls._RENAMES)
        fields["misclassified"] = tuple(fields.get("misclassified") or ())
        return cls(**fields, extra=extra)


@dataclass(frozen=True)
class RunVersion:
    """version.json: the data version a run directory is on, the run-wide step its training starts after, and
    what changed to start it (runner/run/dataversion.py)."""
    number: int = 1
    step_offset: int = 0
    change: str = field(default="", compare=False)

    @property
    def steps(self) -> RunSteps:
        """The run-wide position of this version's first stage."""
        return RunSteps(self.step_offset)

    def to_json(self) -> dict:
        return {"number": self.number, "step_offset": self.step_offset, "change": self.change}

    @classmethod
    def from_json(cls, data: Mapping) -> "RunVersion":
        return cls(int(data["number"]), int(data["step_offset"]), str(data.get("change", "")))
