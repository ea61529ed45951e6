"""Runs that follow the data: when data.dir's classes or images change, the run moves on to a new data version
instead of refusing.

Every checkpoint marker records the data it was trained on (`DataFingerprint`: classes, image count, a digest of
every (path, content hash), and a digest of every image's class and split, so another layout, label file or
split is other data too). When the scan finds other data, the current version's results and checkpoints are
archived under RUN_DIR/versions/vN (RunDir.archive_version), and the new version trains from the cache (only
images not cached yet go through the CNN) with run-wide steps continuing after the old version's last one, so
sync's "newest snapshot" is the newest version's. Unchanged data resumes exactly as before. No TensorFlow here.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from common.files import write_text_atomic
from runner.data.scan import Dataset
from runner.run.rundir import RunDir, read_json

log = logging.getLogger("runner")


@dataclass(frozen=True)
class DataFingerprint:
    """What a checkpoint was trained on: the class names, how many images, a digest of (path, content hash), a
    digest of (path, class, split)."""
    classes: tuple[str, ...]
    images: int | None
    digest: str | None        # None for checkpoints written before data versions existed (classes only)
    assignment: str | None = None  # None for checkpoints written before layouts existed (not compared)

    @classmethod
    def of(cls, dataset: Dataset) -> "DataFingerprint":
        records = sorted(dataset.images, key=lambda r: r.relpath)
        lines = "".join(f"{r.relpath}\t{r.sha256}\n" for r in records)
        assigned = "".join(f"{r.relpath}\t{dataset.classes[r.label]}\t{r.split}\n" for r in records)
        return cls(tuple(dataset.classes), len(dataset.images), _sha256(lines), _sha256(assigned))

    @classmethod
    def from_marker(cls, marker: dict) -> "DataFingerprint":
        data = marker.get("data") or {}
        return cls(tuple(marker.get("classes", [])), data.get("images"), data.get("digest"), data.get("assignment"))

    def to_json(self) -> dict:
        return {"images": self.images, "digest": self.digest, "assignment": self.assignment}

    def same_data(self, other: "DataFingerprint") -> bool:
        """Whether a run on `other` continues this one (an old marker without a digest compares classes only,
        one without an assignment digest does not compare classes and splits per image)."""
        if self.classes != other.classes:
            return False
        if self.digest is not None and other.digest is not None and self.digest != other.digest:
            return False
        return self.assignment is None or other.assignment is None or self.assignment == other.assignment


@dataclass(frozen=True)
class RunVersion:
    """The data version a run directory is on, and the run-wide step its training starts after."""
    number: int = 1
    step_offset: int = 0

    @classmethod
    def read(cls, run: RunDir) -> "RunVersion":
        data = read_json(run.version_record)
        return cls(int(data["number"]), int(data["step_offset"])) if data else cls()

    def write(self, run: RunDir, change: str) -> None:
        write_text_atomic(run.version_record, json.dumps({"number": self.number, "step_offset": self.step_offset,
                                                          "change": change}, indent=1))


def describe_change(old: DataFingerprint, dataset: Dataset, previous_scan: dict[str, list]) -> str:
    """What changed between the data of a checkpoint and this scan: classes added, removed or renamed (a class
    folder whose images moved whole), images new and gone by content. `previous_scan` is the file-hash index of
    the scan before this one (relative path → [size, mtime, sha256]), when there is one."""
    if old.classes == tuple(dataset.classes) and old.digest == DataFingerprint.of(dataset).digest:
        return "the same images, but other classes or splits for some (data.layout, data.labels or split.*)"
    old_classes, new_classes = set(old.classes), set(dataset.classes)
    before = {path: entry[2] for path, entry in previous_scan.items()}
    after = {r.relpath: r.sha256 for r in dataset.images}
    depth = {"classes": 0, "splits": 1}.get(dataset.layout.kind)  # the class folder's place in a path

    def folder_class(path: str) -> str | None:
        parts = path.split("/")
        return parts[depth] if depth is not None and len(parts) > depth + 1 else None
    renamed = {}
    for gone in sorted(old_classes - new_classes):
        gone_content = {sha for path, sha in before.items() if folder_class(path) == gone}
        for new in sorted(new_classes - old_classes - set(renamed.values())):
            new_content = {sha for path, sha in after.items() if folder_class(path) == new}
            if gone_content and len(gone_content & new_content) >= 0.5 * max(len(gone_content), len(new_content)):
                renamed[gone] = new
                break
    parts = []
    added = sorted(new_classes - old_classes - set(renamed.values()))
    removed = sorted(old_classes - new_classes - set(renamed))
    if added:
        parts.append(f"{len(added)} class(es) added ({_names(added)})")
    if removed:
        parts.append(f"{len(removed)} removed ({_names(removed)})")
    if renamed:
        parts.append(f"{len(renamed)} renamed ({', '.join(f'{a!r} → {b!r}' for a, b in list(renamed.items())[:5])})")
    if before:
        new_images = len(set(after.values()) - set(before.values()))
        gone_images = len(set(before.values()) - set(after.values()))
        parts.append(f"{new_images} image(s) added, {gone_images} removed")
    else:
        parts.append(f"{len(dataset.images)} images now, {old.images if old.images is not None else '?'} before")
    return "; ".join(parts)


def follow_data(run: RunDir, dataset: Dataset, previous_scan: dict[str, list]) -> RunVersion:
    """The version this run trains: the current one when the newest checkpoint was trained on this data (or there
    is none); otherwise the current version is archived and a new one starts after its last step."""
    version = RunVersion.read(run)
    latest = run.latest()
    if latest is None:
        return version
    old = DataFingerprint.from_marker(latest.marker)
    if old.same_data(DataFingerprint.of(dataset)):
        return version
    change = describe_change(old, dataset, previous_scan)
    following = RunVersion(version.number + 1, latest.step)
    run.begin_archive(version.number)  # first: a kill from here on is finished at the next start
    following.write(run, change)
    archived = run.archive_version(version.number)
    log.warning("data.dir changed since the checkpoint of step %d: %s. Starting data version %d after step %d; "
                "version %d's results and checkpoints are kept in %s. Only images not cached yet go through the "
                "CNN.", latest.step, change, following.number, latest.step, version.number, archived)
    return following


def finish_interrupted_archive(run: RunDir) -> None:
    """Complete an archive of a data version that a kill interrupted (the decision to archive was taken)."""
    number = run.unfinished_archive()
    if number is None:
        return
    log.warning("finishing the archive of data version %d, which an interrupted start began", number)
    if RunVersion.read(run).number <= number:  # the kill came before the new version was recorded
        partial = run.begin_archive(number)
        steps = [c.step for c in run.checkpoints() + RunDir(partial).checkpoints()]
        RunVersion(number + 1, max(steps, default=0)).write(run, "a start was interrupted while archiving")
    run.archive_version(number)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
