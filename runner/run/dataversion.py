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
import logging
from dataclasses import dataclass

from runner.data.scan import Dataset
from runner.run.records import CheckpointMarker, DataDigest, RunVersion
from runner.run.rundir import RunDir

log = logging.getLogger("runner")


@dataclass(frozen=True)
class DataFingerprint:
    """What a checkpoint was trained on: the class names, how many images, a digest of (path, content hash), and
    a digest of (path, class, split): another layout, label file or split.*_percent moves images between classes or
    between training and test, and is other data too."""
    classes: tuple[str, ...]
    images: int | None
    digest: str | None        # None for checkpoints written before data versions existed (classes only)
    assignment: str | None = None  # None for checkpoints written before it was recorded (not compared)

    @classmethod
    def of(cls, dataset: Dataset) -> "DataFingerprint":
        records = sorted(dataset.images, key=lambda r: r.relpath)
        lines = "".join(f"{r.relpath}\t{r.sha256}\n" for r in records)
        assigned = "".join(f"{r.relpath}\t{dataset.classes[r.label]}\t{r.split}\n" for r in records)
        return cls(tuple(dataset.classes), len(dataset.images), _sha256(lines), _sha256(assigned))

    @classmethod
    def from_marker(cls, marker: CheckpointMarker) -> "DataFingerprint":
        return cls(tuple(marker.classes), marker.data.images, marker.data.digest, marker.data.assignment)

    def digest_record(self) -> DataDigest:
        """What a checkpoint marker records of it besides the classes."""
        return DataDigest(self.images, self.digest, self.assignment)

    def same_data(self, other: "DataFingerprint") -> bool:
        """Whether a run on `other` continues this one: same classes, images, and class and split of each image
        (what an old marker did not record is not compared)."""
        if self.classes != other.classes:
            return False
        return _same(self.digest, other.digest) and _same(self.assignment, other.assignment)


def current_version(run: RunDir) -> RunVersion:
    """The recorded version; without a record, the one after the archived versions (version 1 when none)."""
    recorded = run.read_version()
    if recorded is not None:
        return recorded
    archived = run.archived_versions()
    if not archived:
        return RunVersion()
    inferred = RunVersion(archived[-1] + 1, _step_offset(run, archived[-1]))
    log.warning("%s is missing, but versions/ holds data version(s) %s: this is data version %d, its steps "
                "following step %d", run.version_record, ", ".join(map(str, archived)), inferred.number,
                inferred.step_offset)
    return inferred


def describe_change(old: DataFingerprint, dataset: Dataset, previous_scan: dict[str, list]) -> str:
    """What changed between the data of a checkpoint and this scan: classes added, removed or renamed (a class
    folder whose images moved whole), images new and gone by content. `previous_scan` is the file-hash index of
    the scan before this one (relative path → [size, mtime, sha256]), when there is one."""
    if old.classes == tuple(dataset.classes) and old.digest == DataFingerprint.of(dataset).digest:
        return ("the same images, split anew or relabelled (data.layout, data.labels, split.validation_percent or "
                "split.test_percent changed): a head trained before may have seen images that are now validation "
                "or test images")
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
        moved = _moved(before, after, renamed)
        if moved:
            parts.append(f"{len(moved)} image(s) moved to another class (relabelled: "
                         f"{', '.join(f'{a!r} → {b!r}' for a, b in moved[:3])}{' ...' if len(moved) > 3 else ''})")
    else:
        parts.append(f"{len(dataset.images)} images now, {old.images if old.images is not None else '?'} before")
    return "; ".join(parts)


def _moved(before: dict[str, str], after: dict[str, str], renamed: dict[str, str]) -> list[tuple[str, str]]:
    """Images (by content) that are in another class folder now than before, a renamed class aside:
    (old path, new path) pairs."""
    def by_content(paths: dict[str, str], rename: dict[str, str]) -> dict[str, tuple[str, set[str]]]:
        out: dict[str, tuple[str, set[str]]] = {}
        for path, sha in sorted(paths.items()):
            folder = path.split("/")[0]
            out.setdefault(sha, (path, set()))[1].add(rename.get(folder, folder))
        return out
    old, new = by_content(before, renamed), by_content(after, {})
    return [(old[sha][0], new[sha][0]) for sha in sorted(old.keys() & new.keys(), key=lambda k: old[k][0])
            if old[sha][1] != new[sha][1]]


def follow_data(run: RunDir, dataset: Dataset, previous_scan: dict[str, list]) -> RunVersion:
    """The version this run trains: the current one when the newest checkpoint was trained on this data (or there
    is none); otherwise the current version is archived and a new one starts after its last step."""
    version = current_version(run)
    latest = run.latest()
    if latest is None:
        return version
    old = DataFingerprint.from_marker(latest.marker)
    if old.same_data(DataFingerprint.of(dataset)):
        return version
    change = describe_change(old, dataset, previous_scan)
    following = RunVersion(version.number + 1, latest.step, change)
    run.begin_archive(version.number)  # first: a kill from here on is finished at the next start
    run.write_version(following)
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
    if current_version(run).number <= number:  # the kill came before the new version was recorded
        partial = run.begin_archive(number)
        steps = [c.step for c in run.checkpoints() + RunDir(partial).checkpoints()]
        run.write_version(RunVersion(number + 1, max(steps, default=0), "a start was interrupted while archiving"))
    run.archive_version(number)


def _step_offset(run: RunDir, last_archived: int) -> int:
    """The run-wide step the current version started after: its first head checkpoint's offset, else the last
    checkpoint step of the version archived before it."""
    offsets = [c.marker.steps.offset for c in run.stage("head").checkpoints()]
    if offsets:
        return min(offsets)
    archived = RunDir(run.version_folder(last_archived)).checkpoints()
    return archived[0].step if archived else 0


def _same(recorded: str | None, now: str | None) -> bool:
    return recorded is None or now is None or recorded == now


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
