"""data.dir → its images (runner/data/layout.py: class folders, pre-split folders, a label file) → content
checked and hashed → split (runner/data/splits.py) → Dataset. No TensorFlow here."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.files import write_text_atomic
from runner.data.splits import MAX_NUM_IMAGES_PER_CLASS, DataLayout, SplitPlan, split_of  # noqa: F401  (re-exported)
from runner.errors import DataError, StopRequested
from runner.ui.progress import progress

log = logging.getLogger("runner")

IMAGE_EXTENSIONS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".gif": "gif", ".bmp": "bmp",
                    ".webp": "webp"}
CONVERT = "convert it to JPEG (e.g. `mogrify -format jpg *.heic`, or export as JPEG on the phone)"
UNSUPPORTED_EXTENSIONS = {  # image formats people bring that TensorFlow does not decode: listed, not silent
    ".heic": f"HEIC/HEIF photo (iPhone): not supported; {CONVERT}",
    ".heif": f"HEIC/HEIF photo (iPhone): not supported; {CONVERT}",
    ".avif": f"AVIF image: not supported; {CONVERT}",
    ".tif": f"TIFF image: not supported; {CONVERT}",
    ".tiff": f"TIFF image: not supported; {CONVERT}",
}
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"mif1", b"msf1", b"avif")
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}  # archive and OS litter: not classes, not images


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: where it is, its class, its split and its content hash."""
    path: str          # absolute path
    relpath: str       # relative to data.dir ("class/file.jpg"): the stable key, used in reports
    label: int
    split: str
    sha256: str
    source_split: str | None = None  # the split the dataset itself put it in (None: it has none)


@dataclass
class Dataset:
    """The validated images of a run, their class names, the files that were skipped, and how data.dir was
    read and split."""
    classes: list[str]
    images: list[ImageRecord]
    skipped: list[dict]  # {"path": ..., "reason": ...}
    reader: object = None  # None: images are files (ImageRecord.path); else records → tf.data (bytes, position)
    layout: DataLayout = field(default_factory=lambda: DataLayout("classes", "", SplitPlan(frozenset(), 10, 10)))

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.images if r.split == name]

    def without(self, bad: dict[str, str]) -> "Dataset":
        """A copy without the images whose hash is in `bad` (hash → reason), which become skipped."""
        kept = [r for r in self.images if r.sha256 not in bad]
        newly = [{"path": r.relpath, "reason": bad[r.sha256]} for r in self.images if r.sha256 in bad]
        return Dataset(self.classes, kept, self.skipped + newly, self.reader, self.layout)

    def layout_json(self) -> dict:
        """summary.json's record of the layout and split used, with the dataset's own split counts."""
        return self.layout.to_json([r.source_split for r in self.images])


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
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def is_ignored(name: str) -> bool:
    """Whether a file or folder name is litter to pass over in silence: hidden (`.DS_Store`, macOS's `._x`
    AppleDouble files, `.git`), or `__MACOSX/` and other OS folders."""
    return name.startswith(".") or name in IGNORED_NAMES


def printable(name: str) -> str:
    """A name safe to log and write as JSON: bytes that are not UTF-8 (surrogate-escaped by Python on Linux)
    shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def name_problem(name: str) -> str | None:
    """Why a file or folder name cannot be used (not UTF-8), or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8 (made on another system?); rename it"
    return None


def problem_with(data: bytes, extension: str) -> str | None:
    """Why these bytes cannot be used as an image named with `extension`, or None if they look fine."""
    if not data:
        return "empty file (0 bytes)"
    fmt = sniff_format(data[:16])
    if fmt is None:
        if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
            return f"the content is a HEIC/HEIF/AVIF photo, which is not supported; {CONVERT}"
        return "not an image (unrecognised file header)"
    expected = IMAGE_EXTENSIONS[extension]
    if fmt != expected:
        return f"mislabelled: the content is {fmt.upper()} but the name says {extension}; rename the file"
    end = data.rfind(b"\xff\xd9")  # bytes after the end marker are fine: the decoder ignores them
    if fmt == "jpeg" and (end < 0 or end < data.rfind(b"\xff\xda")):  # none, or only a thumbnail's
        return "truncated JPEG (no end-of-image marker after the image data)"
    if fmt == "png" and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    if fmt == "webp" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        return "truncated WebP (shorter than its RIFF header says)"
    if fmt == "webp" and is_animated_webp(data[:21]):
        return "animated WebP: not supported; save one frame as a still image (JPEG, PNG or WebP)"
    return None


def is_animated_webp(head: bytes) -> bool:
    """Whether a WebP's first 21 bytes declare an animation (extended format with the animation flag)."""
    return head[12:16] == b"VP8X" and len(head) > 20 and bool(head[20] & 0x02)


class HashIndex:
    """Content hashes of data.dir's files by (name relative to data.dir, size, mtime), so an unchanged file
    is never read again: not by a second scan, nor after a restore on a fresh disk (the index travels with
    the cache, and tar, Drive and `cp -p` keep sizes and modification times).

    The inode is deliberately not part of the key: a fresh disk gives every file a new one. A file written
    less than RACY_SECONDS before its hash was taken is not remembered (it could still change within the
    same mtime tick); it is hashed again next time.

    Saved as `file-hashes.json` (the working copy) plus an immutable, content-named copy
    `file-hashes-<sha>.json` that is handed to sync with the cache shards (see shipped_name)."""

    FORMAT = 2
    RACY_SECONDS = 2.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, list] = {}
        self.shipped_name: str | None = None
        for candidate in [self.path] + self._shipped_copies():  # the working copy, else one restored by sync
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                continue
            if isinstance(data, dict) and data.get("format") == self.FORMAT:
                self.entries = data["entries"]
                break

    def _shipped_copies(self) -> list[Path]:
        """The content-named copies beside the working copy, newest first."""
        copies = self.path.parent.glob(f"{self.path.stem}-*{self.path.suffix}")
        return sorted(copies, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def lookup(self, relpath: str, stat: os.stat_result) -> str | None:
        """The remembered hash of `relpath` if its size and mtime are unchanged, else None."""
        entry = self.entries.get(relpath)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        return None

    def remember(self, relpath: str, stat: os.stat_result, digest: str, now: float) -> None:
        """Record the hash of a file just read (unless it was modified too recently to trust its mtime)."""
        if now - stat.st_mtime_ns / 1e9 >= self.RACY_SECONDS:
            self.entries[relpath] = [stat.st_size, stat.st_mtime_ns, digest]
        else:
            self.entries.pop(relpath, None)

    def save(self, keep: set[str] | None = None) -> None:
        """Write the working copy and the content-named copy for sync; forget files not in `keep` (a whole
        scan's names; None, for a scan cut short, keeps every entry)."""
        if keep is not None:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
        text = json.dumps({"format": self.FORMAT, "entries": self.entries}, separators=(",", ":"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._holds(self.path, text):  # an unchanged index is not rewritten (a finished run re-run)
            write_text_atomic(self.path, text)
        name = f"{self.path.stem}-{hashlib.sha256(text.encode()).hexdigest()[:16]}{self.path.suffix}"
        if not (self.path.parent / name).exists():
            write_text_atomic(self.path.parent / name, text)
        for old in self._shipped_copies():
            if old.name != name:
                old.unlink(missing_ok=True)
        self.shipped_name = name

    @staticmethod
    def _holds(path: Path, text: str) -> bool:
        try:
            return path.read_text(encoding="utf-8") == text
        except (OSError, ValueError):
            return False


def list_class_folders(data_dir: Path, skipped: list[dict] | None = None, at_least: int = 2) -> list[str]:
    """Sorted class names (the sub-folders of data_dir, litter aside), at least `at_least` of them; folders
    whose name cannot be used are added to `skipped`."""
    if not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} is not a folder; point data.dir at a folder with one "
                        f"sub-folder of images per class.")
    classes = []
    for p in data_dir.iterdir():
        if is_ignored(p.name) or not _is_dir(p):
            continue
        problem = name_problem(p.name)
        if problem:
            _skip(skipped, printable(p.name) + "/", f"class folder skipped: {problem}")
        else:
            classes.append(p.name)
    classes.sort()
    if len(classes) < at_least:
        raise DataError(f"data.dir {data_dir} has {len(classes)} class folder(s); a classifier needs at "
                        f"least 2 sub-folders, one per class, each holding that class's images.")
    return classes


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a symlink loop (ELOOP) or an unreadable link: not a folder to scan
        return False


def _identity(folder: Path) -> tuple[int, int]:
    info = folder.stat()
    return info.st_dev, info.st_ino


def _skip(skipped: list[dict] | None, relpath: str, reason: str) -> None:
    if skipped is not None:
        skipped.append({"path": relpath, "reason": reason})
        log.warning("skipped %s: %s", relpath, reason)


def image_entries(folder: Path, parts: tuple[str, ...], skipped: list[dict] | None = None,
                  visited: set[tuple[int, int]] | None = None) -> list[tuple[tuple[str, ...], os.DirEntry]]:
    """The image files below `folder` as (path parts relative to data.dir, directory entry), in any order
    (os.scandir: one stat per file, none for the listing). Litter is passed over; unusable names, files of
    unsupported formats, broken links and links back to a folder already scanned (a loop) go to `skipped`."""
    visited = {_identity(folder)} if visited is None else visited
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if is_ignored(entry.name):
                continue
            relpath = printable("/".join(parts + (entry.name,)))
            extension = os.path.splitext(entry.name)[1].lower()
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as e:  # ELOOP: a link to itself
                is_dir = is_file = False
                if extension in IMAGE_EXTENSIONS:
                    _skip(skipped, relpath, f"unreadable link: {e.strerror or e}")
                continue
            problem = name_problem(entry.name) if (is_dir or extension in IMAGE_EXTENSIONS) else None
            if problem:
                _skip(skipped, relpath + ("/" if is_dir else ""), problem)
            elif is_dir:
                identity = _identity(Path(entry.path))
                if identity in visited:
                    _skip(skipped, relpath + "/", "symbolic link to a folder already scanned (a link loop, or a "
                                                  "second link to the same folder): not followed")
                    continue
                visited.add(identity)
                found += image_entries(Path(entry.path), parts + (entry.name,), skipped, visited)
            elif extension in UNSUPPORTED_EXTENSIONS and is_file:
                _skip(skipped, relpath, UNSUPPORTED_EXTENSIONS[extension])
            elif extension in IMAGE_EXTENSIONS:
                if is_file:
                    found.append((parts + (entry.name,), entry))
                elif entry.is_symlink():
                    _skip(skipped, relpath, "broken symbolic link (its target does not exist)")
    return found


def _read_advice(e: OSError) -> str:
    """What to do about a file the scan could not read."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "fix its permissions"
    if isinstance(e, FileNotFoundError):
        return "it went (moved or deleted) during the scan; the next start scans it again"
    return "a read failure (a network mount?); the next start reads it again"


def scan_dataset(data_dir: Path, validation_percent: float, test_percent: float,
                 hash_index: HashIndex, min_images_per_class: int, progress_mode: str = "auto",
                 stop=None, layout: str = "auto", labels: str = "", labels_columns: str = "") -> Dataset:
    """Find, hash, check and split every image below data_dir; bad files are skipped and listed. `layout`,
    `labels`, `labels_columns`: the data.* settings of the same names (runner/data/layout.py). A truthy
    `stop` (a StopFlag) ends the scan with StopRequested, the hashes read so far saved for the next start."""
    from runner.data.layout import list_images  # builds on this module's tree walk
    data_dir = Path(data_dir).resolve()
    skipped: list[dict] = []
    listing = list_images(data_dir, layout, labels, labels_columns, skipped)
    classes, label_of = listing.classes, {name: i for i, name in enumerate(listing.classes)}
    plan = SplitPlan(listing.own_splits, validation_percent, test_percent)
    images, seen, candidates = [], set(), listing.candidates
    log.info("checking %d image files in %s", len(candidates), data_dir)
    bar = progress(len(candidates), "checking images", "img", progress_mode)
    for candidate in candidates:
        parts, entry = candidate.parts, candidate.entry
        if stop:
            hash_index.save()
            raise StopRequested(stop.signal_name, "the image scan")
        bar.update()
        file, relpath = Path(entry.path), "/".join(parts)
        seen.add(relpath)
        try:
            stat = entry.stat()
            digest = hash_index.lookup(relpath, stat)
            if digest is not None and not os.access(file, os.R_OK):  # known, but extraction could not read it
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            data = file.read_bytes() if digest is None else b""
        except OSError as e:  # this run only: nothing about the file is remembered
            skipped.append({"path": relpath, "reason": f"unreadable: {e.strerror or e}; {_read_advice(e)}"})
            log.warning("skipped %s: %s", relpath, skipped[-1]["reason"])
            continue
        if digest is None:
            reason = problem_with(data, file.suffix.lower())
            if reason:
                skipped.append({"path": relpath, "reason": reason})
                log.warning("skipped %s: %s", relpath, reason)
                continue
            digest = hashlib.sha256(data).hexdigest()
            hash_index.remember(relpath, stat, digest, time.time())
        split = plan.assign(relpath, candidate.own_split)
        images.append(ImageRecord(str(file), relpath, label_of[candidate.label], split, digest, candidate.own_split))
    bar.close()
    hash_index.save(seen)
    dataset = Dataset(classes, images, skipped, layout=DataLayout(listing.kind, listing.detail, plan))
    log.info("%s", dataset.layout.describe())
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
        why = ("all of theirs fell into validation or test" if not dataset.layout.plan.uses_own else
               "the dataset's train split holds none that could be used")
        raise DataError(f"class(es) {', '.join(repr(n) for n in untrained[:10])} have no image in the training "
                        f"split ({why}), so the head could never learn them. Add images to those classes, or "
                        f"remove them.")
