"""Class folders → stable hash split → validated image list (no TensorFlow here)."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.files import write_text_atomic
from runner.errors import DataError, StopRequested
from runner.progress import progress

log = logging.getLogger("runner")

IMAGE_EXTENSIONS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".gif": "gif", ".bmp": "bmp"}
MAX_NUM_IMAGES_PER_CLASS = 2 ** 27 - 1  # retrain.py's constant: keeps the split stable as images are added


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: where it is, its class, its split and its content hash."""
    path: str          # absolute path
    relpath: str       # "class/file.jpg", used in reports
    label: int
    split: str
    sha256: str


@dataclass
class Dataset:
    """The validated images of a run, their class names, and the files that were skipped."""
    classes: list[str]
    images: list[ImageRecord]
    skipped: list[dict]  # {"path": ..., "reason": ...}

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.images if r.split == name]

    def without(self, bad: dict[str, str]) -> "Dataset":
        """A copy without the images whose hash is in `bad` (hash → reason), which become skipped."""
        kept = [r for r in self.images if r.sha256 not in bad]
        newly = [{"path": r.relpath, "reason": bad[r.sha256]} for r in self.images if r.sha256 in bad]
        return Dataset(self.classes, kept, self.skipped + newly)


def split_of(relative_name: str, validation_percent: float, test_percent: float) -> str:
    """retrain.py's split: hash the file's name relative to data.dir ("class/file.jpg"), ignoring anything
    after `_nohash_`, into a percentage."""
    hash_name = re.sub(r"_nohash_.*$", "", relative_name)
    hashed = int(hashlib.sha1(hash_name.encode("utf-8")).hexdigest(), 16)
    percentage = (hashed % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)
    if percentage < validation_percent:
        return "validation"
    if percentage < validation_percent + test_percent:
        return "test"
    return "train"


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None if it is not an image we read."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    return None


def problem_with(data: bytes, extension: str) -> str | None:
    """Why these bytes cannot be used as an image named with `extension`, or None if they look fine."""
    if not data:
        return "empty file (0 bytes)"
    fmt = sniff_format(data[:16])
    if fmt is None:
        return "not an image (unrecognised file header)"
    expected = IMAGE_EXTENSIONS[extension]
    if fmt != expected:
        return f"mislabelled: the content is {fmt.upper()} but the name says {extension}; rename the file"
    end = data.rfind(b"\xff\xd9")  # bytes after the end marker are fine: the decoder ignores them
    if fmt == "jpeg" and (end < 0 or end < data.rfind(b"\xff\xda")):  # none, or only a thumbnail's
        return "truncated JPEG (no end-of-image marker after the image data)"
    if fmt == "png" and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


class HashIndex:
    """Remembers file content hashes by (size, mtime) so a restart does not re-read every image."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            self.entries = {}

    def lookup(self, file: Path, stat: os.stat_result) -> str | None:
        entry = self.entries.get(str(file))
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        return None

    def remember(self, file: Path, stat: os.stat_result, digest: str) -> None:
        self.entries[str(file)] = [stat.st_size, stat.st_mtime_ns, digest]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.entries))


def list_class_folders(data_dir: Path) -> list[str]:
    """Sorted class names (the sub-folders of data_dir)."""
    if not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} is not a folder; point data.dir at a folder with one "
                        f"sub-folder of images per class.")
    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"data.dir {data_dir} has {len(classes)} class folder(s); a classifier needs at "
                        f"least 2 sub-folders, one per class, each holding that class's images.")
    return classes


def scan_dataset(data_dir: Path, validation_percent: float, test_percent: float,
                 hash_index: HashIndex, min_images_per_class: int, progress_mode: str = "auto",
                 stop=None) -> Dataset:
    """Find, hash, check and split every image below data_dir; bad files are skipped and listed. A truthy
    `stop` (a StopFlag) ends the scan with StopRequested, the hashes read so far saved for the next start."""
    data_dir = Path(data_dir).resolve()
    classes = list_class_folders(data_dir)
    candidates = []
    for label, name in enumerate(classes):
        for file in sorted((data_dir / name).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS and not file.name.startswith("."):
                candidates.append((label, file))
    images, skipped = [], []
    log.info("checking %d image files in %s", len(candidates), data_dir)
    bar = progress(len(candidates), "checking images", "img", progress_mode)
    for label, file in candidates:
        if stop:
            hash_index.save()
            raise StopRequested(stop.signal_name, "the image scan")
        bar.update()
        relpath = file.relative_to(data_dir).as_posix()
        try:
            stat = file.stat()
            digest = hash_index.lookup(file, stat)
            if digest is not None and not os.access(file, os.R_OK):  # known, but extraction could not read it
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            data = file.read_bytes() if digest is None else b""
        except OSError as e:
            skipped.append({"path": relpath, "reason": f"unreadable: {e.strerror or e}; fix its permissions"})
            log.warning("skipped %s: %s", relpath, skipped[-1]["reason"])
            continue
        if digest is None:
            reason = problem_with(data, file.suffix.lower())
            if reason:
                skipped.append({"path": relpath, "reason": reason})
                log.warning("skipped %s: %s", relpath, reason)
                continue
            digest = hashlib.sha256(data).hexdigest()
            hash_index.remember(file, stat, digest)
        split = split_of(relpath, validation_percent, test_percent)
        images.append(ImageRecord(str(file), relpath, label, split, digest))
    bar.close()
    hash_index.save()
    dataset = Dataset(classes, images, skipped)
    check_class_sizes(dataset, min_images_per_class)
    return dataset


def check_class_sizes(dataset: Dataset, min_images_per_class: int) -> None:
    """Stop early, naming the class, when a class has too few usable images."""
    counts = [0] * len(dataset.classes)
    for record in dataset.images:
        counts[record.label] += 1
    small = [(name, n) for name, n in zip(dataset.classes, counts) if n < min_images_per_class]
    if small:
        listing = ", ".join(f"'{name}' has {n}" for name, n in small[:10])
        more = f" (and {len(small) - 10} more)" if len(small) > 10 else ""
        raise DataError(f"too few usable images: {listing}{more}; each class needs at least "
                        f"{min_images_per_class} (data.min_images_per_class). Add images or remove the "
                        f"class folder.")
    if not dataset.split("train"):
        raise DataError("no image fell into the training split; lower split.validation_percent / "
                        "split.test_percent or add images.")
    in_train = {r.label for r in dataset.split("train")}
    untrained = [name for label, name in enumerate(dataset.classes) if label not in in_train]
    if untrained:
        raise DataError(f"class(es) {', '.join(repr(n) for n in untrained[:10])} have no image in the training "
                        f"split (all of theirs fell into validation or test), so the head could never learn "
                        f"them. Add images to those class folders, or remove the folders.")
