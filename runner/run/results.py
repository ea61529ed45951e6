"""The typed results of a run: what each stage returns, the head search's summary, the head-stage record
(head_stage.json), the run's summary (summary.json) and the job's outcome. The job writes them, the report, the
notebook and resume.py read them, both through the run directory (runner/run/rundir.py). No TensorFlow here.

The JSON files keep the keys they always had (summary.json's search figures at its top level), so runs
written by earlier versions still read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from runner.run.records import Evaluation


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate of the head search: its grid point and how it did on the validation split."""
    learning_rate: float
    weight_decay: float
    best_val_loss: float | None
    best_val_accuracy: float | None
    best_step: int
    final_learning_rate: float
    status: str                    # training (the budget ended) / stopped (patience) / pruned (a rung)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SearchSummary:
    """The head search's outcome: every candidate, the one selected and the ones averaged into the head."""
    candidates: tuple[CandidateRecord, ...]
    selected: int
    averaged: tuple[int, ...]

    @property
    def selected_candidate(self) -> CandidateRecord:
        return self.candidates[self.selected]

    def to_json(self) -> dict:
        """`selected` (the chosen candidate's row, its index and the averaged ones) and `candidates`."""
        rows = [c.to_json() for c in self.candidates]
        return {"selected": dict(rows[self.selected], candidate=self.selected, averaged=list(self.averaged)),
                "candidates": rows}

    @classmethod
    def from_json(cls, data: dict | None) -> "SearchSummary | None":
        if not data or not data.get("candidates"):
            return None
        fields = {f.name for f in dataclasses.fields(CandidateRecord)}
        candidates = tuple(CandidateRecord(**{k: v for k, v in row.items() if k in fields})
                           for row in data["candidates"])
        selected = data["selected"]
        return cls(candidates, int(selected["candidate"]),
                   tuple(selected.get("averaged") or [selected["candidate"]]))


@dataclass(frozen=True)
class StageResult:
    """How a stage's training ended: its stage-local step, the signal that stopped it (None when it finished),
    its last evaluation, whether this process trained at all, and (head search only) the search's summary."""
    stage: str
    step: int
    stopped_by: str | None
    last_eval: Evaluation | None = None
    trained: bool = False
    search: SearchSummary | None = None


@dataclass(frozen=True)
class HeadRecord:
    """head_stage.json: what the finished head stage measured, kept for fine-tuning and the summary."""
    test_accuracy: float | None
    steps: int
    search: SearchSummary | None

    def to_json(self) -> dict:
        return {"test_accuracy": self.test_accuracy, "steps": self.steps,
                "search": self.search.to_json() if self.search else None}

    @classmethod
    def from_json(cls, data: dict) -> "HeadRecord":
        return cls(data.get("test_accuracy"), int(data["steps"]), SearchSummary.from_json(data.get("search")))


@dataclass(frozen=True)
class Summary:
    """summary.json: the results of a finished run."""
    test_accuracy: float | None
    test_loss: float | None
    val_accuracy: float | None
    val_loss: float | None
    global_step: int
    stage: str                           # the last stage trained: head or finetune
    head_steps: int
    finetune_steps: int
    classes: list[str]
    num_train: int
    num_val: int
    num_test: int
    head_only_test_accuracy: float | None
    backbone: dict
    resumed_from: list[int]
    skipped_images: list[dict]
    per_class_accuracy: dict
    runner_version: str
    data_version: int = 1                # runner/run/dataversion.py: which version of data.dir this run is on
    data_layout: dict | None = None      # how data.dir was read and split, the dataset's own split counts
    search: SearchSummary | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "search"}
        data["num_classes"] = self.num_classes
        return dict(data, **(self.search.to_json() if self.search else {}))

    @classmethod
    def from_json(cls, data: dict) -> "Summary":
        names = {f.name for f in dataclasses.fields(cls)} - {"search"}
        return cls(**{k: data[k] for k in names if k in data}, search=SearchSummary.from_json(data))


@dataclass(frozen=True)
class Finished:
    """The run trained to its end (this time, or after a resume) and wrote its results."""
    summary: Summary


@dataclass(frozen=True)
class Unchanged:
    """The run had finished before and nothing changed: nothing was written, exported or uploaded."""
    summary: Summary


@dataclass(frozen=True)
class Stopped:
    """A signal stopped the run; what was done is kept. `step` is the run-wide step of the checkpoint saved
    (training), or None when it stopped in another phase (`phase`: the scan, extraction, a restore)."""
    signal: str
    phase: str
    step: int | None = None


Outcome = Finished | Unchanged | Stopped
