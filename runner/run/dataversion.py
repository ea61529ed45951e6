"""Runs that follow the data: when data.dir's classes or images change, the run moves on to a new data version
instead of refusing.

Every checkpoint marker records the data it was trained on (`DataFingerprint`: classes, image count, a digest of
every (path, content hash)). When the scan finds other data, the current version's results and checkpoints are
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
    """What a checkpoint was trained on: the class names, how many images, a digest of (path, content hash)."""
    classes: tuple[str, ...]
    images: int | None
    digest: str | None        # None for checkpoints written before data versions existed (classes only)

    @classmethod
    def of(cls, dataset: Dataset) -> "DataFingerprint":
        lines = "".join(f"{r.relpath}\t{r.sha256}\n" for r in sorted(dataset.images, key=lambda r: r.relpath))
        return cls(tuple(dataset.classes), len(dataset.images), hashlib.sha256(lines.encode()).hexdigest())

    @classmethod
    def from_marker(cls, marker: CheckpointMarker) -> "DataFingerprint":
        return cls(tuple(marker.classes), marker.data.images, marker.data.digest)

    def digest_record(self) -> DataDigest:
        """What a checkpoint marker records of it besides the classes."""
        return DataDigest(self.images, self.digest)

    def same_data(self, other: "DataFingerprint") -> bool:
        """Whether a run on `other` continues this one (an old marker without a digest compares classes only)."""
        if self.classes != other.classes:
            return False
        return self.digest is None or other.digest is None or self.digest == other.digest


def describe_change(old: DataFingerprint, dataset: Dataset, previous_scan: dict[str, list]) -> str:
    """What changed between the data of a checkpoint and this scan: classes added, removed or renamed (a class
    folder whose images moved whole), images new and gone by content. `previous_scan` is the file-hash index of
    the scan before this one (relative path → [size, mtime, sha256]), when there is one."""
    old_classes, new_classes = set(old.classes), set(dataset.classes)
    before = {path: entry[2] for path, entry in previous_scan.items()}
    after = {r.relpath: r.sha256 for r in dataset.images}
    renamed = {}
    for gone in sorted(old_classes - new_classes):
        gone_content = {sha for path, sha in before.items() if path.split("/")[0] == gone}
        for new in sorted(new_classes - old_classes - set(renamed.values())):
            new_content = {sha for path, sha in after.items() if path.split("/")[0] == new}
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
    version = run.read_version()
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
    if run.read_version().number <= number:  # the kill came before the new version was recorded
        partial = run.begin_archive(number)
        steps = [c.step for c in run.checkpoints() + RunDir(partial).checkpoints()]
        run.write_version(RunVersion(number + 1, max(steps, default=0), "a start was interrupted while archiving"))
    run.archive_version(number)


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
