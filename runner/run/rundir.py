"""The run directory's layout, in one place: both stages' checkpoints, records, metrics log, export.

Nothing else knows a file or folder name inside a run directory: job, export, report, classify and
the sync hand-over ask a RunDir. Steps are run-wide everywhere (fine-tune steps follow the head's);
a checkpoint's files keep its stage-local step in their names and its marker records the offset.
No TensorFlow here.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from common.files import write_text_atomic
from runner.run.checkpoint_state import write_checkpoint_state
from runner.errors import RunnerError

log = logging.getLogger("runner")

STAGES = ("head", "finetune")                     # in training order
_STAGE_FOLDERS = {"head": "checkpoints", "finetune": "finetune/checkpoints"}
_PREFIX = "ckpt"
_MARKER = re.compile(rf"^{_PREFIX}-(\d+)\.json$")
CONFIG, LABELS, METRICS = "config.toml", "labels.json", "metrics.jsonl"
SUMMARY, TEST_REPORT, HEAD_RECORD = "summary.json", "test_report.json", "head_stage.json"
EXPORT, REPORT, TENSORBOARD = "export", "report", "tensorboard"
VERSION_RECORD, VERSIONS = "version.json", "versions"   # the data version this run is on; earlier ones' results
EXPORT_MODEL_INFO = "model.json"                  # the export's description, inside EXPORT


@dataclass(frozen=True)
class CheckpointRef:
    """One complete (marked) checkpoint: its stage, stage-local and run-wide step, and marker."""
    stage: str
    local_step: int
    step: int       # run-wide, as in metrics.jsonl and summary.json
    marker: dict
    prefix: Path    # the path TensorFlow reads (prefix.index, prefix.data-*)


class StageCheckpoints:
    """The checkpoint files of one stage: names, listing, markers and the one retention rule."""

    def __init__(self, run_dir: Path, stage: str):
        self.run_dir, self.stage = Path(run_dir), stage
        self.dir = self.run_dir / _STAGE_FOLDERS[stage]

    def prefix(self, local_step: int) -> Path:
        """The TensorFlow path prefix of the checkpoint of a stage-local step."""
        return self.dir / f"{_PREFIX}-{local_step}"

    def marker_path(self, local_step: int) -> Path:
        """The JSON marker that makes a checkpoint complete."""
        return self.dir / f"{_PREFIX}-{local_step}.json"

    def data_files(self, local_step: int) -> list[Path]:
        """TensorFlow's files of one checkpoint (index and data shards)."""
        return sorted(p for p in self.dir.glob(f"{_PREFIX}-{local_step}.*") if p.suffix != ".json")

    def steps(self) -> list[int]:
        """Stage-local steps of marked checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted((int(m.group(1)) for p in self.dir.iterdir() if (m := _MARKER.match(p.name))),
                      reverse=True)

    def read_marker(self, local_step: int) -> dict:
        """A checkpoint's marker; OSError or ValueError when it is missing or unreadable."""
        return json.loads(self.marker_path(local_step).read_text(encoding="utf-8"))

    def write_marker(self, local_step: int, marker: dict) -> None:
        """Write the marker last, atomically: from now on the checkpoint counts."""
        write_text_atomic(self.marker_path(local_step), json.dumps(marker, indent=1, sort_keys=True))

    def ref(self, local_step: int, marker: dict) -> CheckpointRef:
        """The CheckpointRef of a stage-local step with its marker."""
        return CheckpointRef(self.stage, local_step, local_step + int(marker["step_offset"]), marker,
                             self.prefix(local_step))

    def checkpoints(self) -> list[CheckpointRef]:
        """The checkpoints whose marker reads, newest first."""
        found = []
        for local_step in self.steps():
            try:
                found.append(self.ref(local_step, self.read_marker(local_step)))
            except (OSError, ValueError, KeyError):
                log.warning("checkpoint marker %s is unreadable; ignored", self.marker_path(local_step))
        return found

    def latest(self) -> CheckpointRef | None:
        """The newest checkpoint whose marker reads, without loading any variables."""
        found = self.checkpoints()
        return found[0] if found else None

    def relative_files(self, local_step: int) -> list[str]:
        """A checkpoint's files (data, then marker) relative to the run dir."""
        paths = self.data_files(local_step) + [self.marker_path(local_step)]
        return [p.relative_to(self.run_dir).as_posix() for p in paths if p.is_file()]

    def write_state(self, keep: int) -> None:
        """TensorFlow's `checkpoint` state file naming the newest `keep` marked checkpoints (for
        tf.train.latest_checkpoint and CheckpointManager; never read back here): written after the marker,
        before pruning, so it names only complete checkpoints that exist."""
        write_checkpoint_state(self.dir, [self.prefix(step).name for step in reversed(self.steps()[:keep])])

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints (marker first, so none is ever half-listed)."""
        for local_step in self.steps()[keep:]:
            self.marker_path(local_step).unlink(missing_ok=True)
            for path in self.data_files(local_step):
                path.unlink(missing_ok=True)


class MetricsLog:
    """metrics.jsonl: one JSON record per evaluation; a torn last line (a kill mid-write) is dropped."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _lines(self) -> tuple[list[dict], bool]:
        """(records, whether a torn last line was found); RunnerError for a bad line before the last."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], False
        lines = text.split("\n")
        records, torn = [], False
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines):  # the last line, not newline-terminated: a write cut short
                    torn = True
                    continue
                raise RunnerError(f"{self.path} line {number} is not JSON; delete that line (or the file, "
                                  f"losing the curves) and run again.") from None
        return records, torn

    def read(self) -> list[dict]:
        """The records in order (a torn last line is left out)."""
        return self._lines()[0]

    def append(self, record: dict) -> None:
        """Add one record (dropping a torn last line first, so lines never run together)."""
        if self.path.exists() and self._lines()[1]:
            self.trim(None)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def trim(self, step: int | None) -> None:
        """Keep the records up to run-wide `step` (all when None), dropping a torn last line."""
        records, torn = self._lines()
        kept = [r for r in records if step is None or r.get("step", 0) <= step]
        if torn or len(kept) != len(records):
            if torn:
                log.warning("%s ended with a torn line (a kill while writing); dropped it", self.path)
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        """Start the log over (a run with no checkpoint)."""
        self.path.unlink(missing_ok=True)


class RunDir:
    """One run directory: where each of its files lives, and the file list of a snapshot."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics = MetricsLog(self.path / METRICS)

    def __str__(self) -> str:
        return str(self.path)

    # -- files ------------------------------------------------------------------------------------------
    config = property(lambda self: self.path / CONFIG, doc="the resolved settings of the run")
    labels = property(lambda self: self.path / LABELS, doc="the label map (class index → folder name)")
    summary = property(lambda self: self.path / SUMMARY, doc="the results of the finished run")
    test_report = property(lambda self: self.path / TEST_REPORT, doc="per-class accuracy, confusion, mistakes")
    head_record = property(lambda self: self.path / HEAD_RECORD, doc="what the finished head stage measured")
    export = property(lambda self: self.path / EXPORT, doc="the exported model folder")
    report = property(lambda self: self.path / REPORT, doc="plots and text reports")
    tensorboard = property(lambda self: self.path / TENSORBOARD, doc="TensorBoard event files")

    version_record = property(lambda self: self.path / VERSION_RECORD,
                              doc="which data version the run is on and the run-wide step it started at")

    def version_folder(self, number: int) -> Path:
        """Where the results of an earlier data version are kept (export, summary, report, checkpoints)."""
        return self.path / VERSIONS / f"v{number}"

    def _partial_archive(self, number: int) -> Path:
        target = self.version_folder(number)
        return target.with_name(f".{target.name}-partial")

    def begin_archive(self, number: int) -> Path:
        """Record the intent to archive version `number` (its partial folder): from here on a start finishes it."""
        partial = self._partial_archive(number)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def archive_version(self, number: int) -> Path:
        """Move the current version's results and checkpoints into version_folder(number), leaving the cache,
        TensorBoard and sync's state in place. Each item moves by one rename into the partial folder, which is
        renamed whole at the end, so a kill mid-way is finished by calling this again (`unfinished_archive`)."""
        target, partial = self.version_folder(number), self.begin_archive(number)
        for name in (CONFIG, LABELS, METRICS, SUMMARY, TEST_REPORT, HEAD_RECORD, EXPORT, REPORT,
                     *dict.fromkeys(folder.split("/")[0] for folder in _STAGE_FOLDERS.values())):
            if (self.path / name).exists():
                (self.path / name).replace(partial / name)
        partial.replace(target)
        return target

    def unfinished_archive(self) -> int | None:
        """The number of a version whose archive a kill interrupted, or None."""
        folder = self.path / VERSIONS
        partial = sorted(folder.glob(".v*-partial")) if folder.is_dir() else []
        return int(partial[0].name[2:].split("-")[0]) if partial else None

    def export_info(self) -> dict | None:
        """The export's model.json, or None when there is no export."""
        return read_json(self.export / EXPORT_MODEL_INFO)

    # -- checkpoints ------------------------------------------------------------------------------------
    def stage(self, name: str) -> StageCheckpoints:
        """The checkpoints of one stage ('head' or 'finetune')."""
        return StageCheckpoints(self.path, name)

    def checkpoints(self) -> list[CheckpointRef]:
        """Both stages' checkpoints, newest run-wide step first (on a tie the later stage first)."""
        found = [ref for stage in STAGES for ref in self.stage(stage).checkpoints()]
        return sorted(found, key=lambda c: (c.step, STAGES.index(c.stage)), reverse=True)

    def latest(self) -> CheckpointRef | None:
        """The newest checkpoint of either stage."""
        found = self.checkpoints()
        return found[0] if found else None

    def checkpoint_at(self, step: int | None) -> CheckpointRef:
        """The checkpoint of run-wide `step` (the newest when None); RunnerError naming what exists."""
        found = self.checkpoints()
        if not found:
            raise RunnerError(f"{self.path} holds no complete checkpoint; train first (python resume.py "
                              f"--set run.dir={self.path}) or pass the right --run folder.")
        if step is None:
            return found[0]
        for ref in found:
            if ref.step == step:
                return ref
        raise RunnerError(f"--step {step}: {self.path} has no complete checkpoint of that step; available "
                          f"steps: {', '.join(str(c.step) for c in reversed(found))}.")

    # -- the hand-over ---------------------------------------------------------------------------------
    def hand_over(self, checkpoint: CheckpointRef, final: bool = False) -> dict[str, bool]:
        """The complete file list of a snapshot of `checkpoint`, relative path → immutable.

        Immutable = never changed in place (written once, or replaced whole by an atomic rename), so a
        hard link is a faithful copy; only the metrics log grows in place. A final snapshot adds the
        results, the export and the report."""
        files = {rel: True for rel in self.stage(checkpoint.stage).relative_files(checkpoint.local_step)}
        for path in (self.config, self.labels, self.head_record, self.version_record):
            if path.is_file():
                files[path.name] = True
        if self.metrics.path.is_file():
            files[METRICS] = False
        if final:
            for path in (self.summary, self.test_report):
                if path.is_file():
                    files[path.name] = True
            for folder in (self.export, self.report):
                for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
                    if path.is_file():
                        files[path.relative_to(self.path).as_posix()] = True
        return files

    def published(self, files: dict[str, bool]) -> list[str]:
        """Of a snapshot's files, those worth storing as plain files beside it: the top level of the export
        and the report (readable in Drive's web page without unpacking anything)."""
        folders = (EXPORT, REPORT)
        return [f for f in files if f.count("/") == 1 and f.split("/")[0] in folders]


def read_json(path: Path) -> dict | list | None:
    """A JSON file's content, None when it does not exist; RunnerError naming it when it is invalid."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RunnerError(f"{path} is not valid JSON ({e}); delete it and run again to rewrite it.") from None


def write_json(path: Path, data) -> None:
    """Write a JSON record atomically."""
    write_text_atomic(path, json.dumps(data, indent=1))
