"""Images from a dataset library: `data.dir = "tfds:NAME"` (TensorFlow Datasets) or `"hf:PATH[:CONFIG]"` (Hugging
Face datasets) become ImageRecords like files do: the library's encoded image bytes (never decoded by it) are hashed
by content, checked like files, and split by the dataset's own splits. Extraction reads the same bytes again through
the dataset's reader (runner/data/scan.py Dataset.reader), so the content cache, data versions and resume work as for
a folder. No TensorFlow here: the library modules import it when a run uses them.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterator, Protocol

from common.errors import TransientError
from runner.data.scan import (MAX_NUM_IMAGES_PER_CLASS, Dataset, HashIndex, ImageRecord, check_class_sizes,
                              problem_with, sniff_format)
from runner.errors import DataError, RunnerError, StopRequested
from runner.ui.progress import progress

log = logging.getLogger("runner")

TFDS_PREFIX, HF_PREFIX = "tfds:", "hf:"
REQUIREMENTS = "requirements-datasets.txt"
ROLES = {"train": "train", "training": "train",
         "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
         "test": "test", "testing": "test"}
EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "bmp": ".bmp", "webp": ".webp"}


def is_library_source(data_dir: str) -> bool:
    """Whether data.dir names a dataset of TensorFlow Datasets or Hugging Face datasets."""
    return data_dir.startswith((TFDS_PREFIX, HF_PREFIX))


@dataclass(frozen=True)
class Example:
    """One example of a split as the library stores it: its position in the split, its label (None: none), its
    encoded image bytes (None: none), or why it cannot be used."""
    index: int
    label: int | None
    data: bytes | None
    problem: str | None = None


class LibrarySource(Protocol):
    """A dataset opened in its library (runner/data/tfds_source.py, runner/data/hf_source.py)."""
    spec: str                  # data.dir as given
    description: str           # what the log names: the dataset, its version, the features used
    classes: list[str]         # the ClassLabel's names
    splits: dict[str, int]     # the dataset's split names → how many examples

    def examples(self, split: str) -> Iterator[Example]:
        """The split's examples in the library's stable order."""

    def pipeline(self, locators: list[tuple[str, int]]):
        """A tf.data.Dataset of (encoded bytes, position) for (split, index) locators, position = place in the list,
        in increasing position."""


class LibraryUnavailable(RunnerError, TransientError):
    """The library could not reach its server (the Hub, TFDS's download hosts): retry later (exit 75)."""


def missing_library(spec: str, package: str, error: ImportError) -> DataError:
    """The error for a library that is not installed (exit 2), naming the requirements file."""
    return DataError(f"data.dir {spec} needs the Python package {package}, which could not be imported ({error}). "
                     f"Install the optional dataset libraries: pip install -r {REQUIREMENTS} (Colab has them "
                     f"preinstalled).")


NETWORK_NAMES = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ProxyError", "SSLError",
                 "MaxRetryError", "NewConnectionError", "URLError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                 "ServerDisconnectedError", "ClientConnectorError", "RemoteDisconnected", "gaierror")


def is_unreachable(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says a server could not be reached."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in NETWORK_NAMES:
            return True
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status in (408, 429)):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def open_source(data) -> LibrarySource:
    """The library dataset data.dir names (a DataConfig), downloaded and prepared by its library if needed."""
    if data.dir.startswith(TFDS_PREFIX):
        from runner.data.tfds_source import open_tfds
        return open_tfds(data.dir, data.image_key, data.label_key)
    from runner.data.hf_source import open_hf
    return open_hf(data.dir, data.image_key, data.label_key)


def split_roles(source: LibrarySource) -> dict[str, str]:
    """The dataset's splits used → their role (train, validation, test); other splits are named and left out.
    A dataset with one split, whatever its name, trains on it (validation and test carved out by hash)."""
    roles = {name: ROLES[name.lower()] for name in source.splits if name.lower() in ROLES}
    if not roles and len(source.splits) == 1:
        roles = {next(iter(source.splits)): "train"}
    if "train" not in roles.values():
        raise DataError(f"data.dir {source.spec} has no training split (its splits: "
                        f"{', '.join(source.splits) or 'none'}); a training split is named train or training.")
    others = [name for name in source.splits if name not in roles]
    if others:
        log.info("data.dir %s: split(s) %s not used (only train / validation / test are)", source.spec,
                 ", ".join(others))
    return roles


def carved(digest: str, missing: set[str], validation_percent: float, test_percent: float) -> str:
    """The split of a training example when the dataset lacks a validation and/or test split: the stable hash of
    its encoded bytes (its sha256) as a percentage, the same ranges as a folder's hash split."""
    hashed = int(hashlib.sha1(digest.encode("ascii")).hexdigest(), 16)
    percentage = (hashed % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)
    if "validation" in missing and percentage < validation_percent:
        return "validation"
    if "test" in missing and validation_percent <= percentage < validation_percent + test_percent:
        return "test"
    return "train"


def problem_with_example(example: Example, num_classes: int) -> str | None:
    """Why an example cannot be used (no label, no image, bytes that are no image we decode), or None."""
    if example.problem:
        return example.problem
    if example.label is None or not 0 <= example.label < num_classes:
        return f"no class label (label {example.label})"
    if example.data is None:
        return "no image"
    fmt = sniff_format(example.data[:16])
    return problem_with(example.data, EXTENSIONS.get(fmt, ".jpg"))


def scan_library(config, hash_index: HashIndex, stop=None) -> Dataset:
    """The usable examples of the library dataset data.dir names, hashed by content and split; unusable ones are
    skipped and listed by split and index ("train/17"). The hash index records (id → [size, 0, sha256]) so the
    next scan can say what changed."""
    spec = config.data.dir
    if config.fine_tune.enabled:
        raise DataError(f"fine_tune.enabled = true needs image files, and data.dir {spec} is read from a dataset "
                        f"library: set fine_tune.enabled = false (the head trains on the cached vectors), or write "
                        f"the dataset to class folders and point data.dir there.")
    source = open_source(config.data)
    roles = split_roles(source)
    missing = {"validation", "test"} - set(roles.values())
    carve_note = f"; {' and '.join(sorted(missing))} carved out of train by the hash of each image" if missing else ""
    log.info("data.dir %s: %s; %d classes; splits %s%s", spec, source.description, len(source.classes),
             ", ".join(f"{name} ({source.splits[name]}) as {role}" for name, role in roles.items()), carve_note)
    images, skipped, entries = [], [], {}
    bar = progress(sum(source.splits[name] for name in roles), "reading the dataset", "img", config.train.progress)
    for name, role in roles.items():
        for example in source.examples(name):
            if stop:
                bar.close()
                raise StopRequested(stop.signal_name, "the image scan")
            bar.update()
            relpath = f"{name}/{example.index}"
            reason = problem_with_example(example, len(source.classes))
            if reason:
                skipped.append({"path": relpath, "reason": reason})
                log.warning("skipped %s: %s", relpath, reason)
                continue
            digest = hashlib.sha256(example.data).hexdigest()
            split = role if role != "train" else carved(digest, missing, config.split.validation_percent,
                                                         config.split.test_percent)
            images.append(ImageRecord(f"{spec}#{relpath}", relpath, example.label, split, digest))
            entries[relpath] = [len(example.data), 0, digest]
    bar.close()
    hash_index.entries = entries
    hash_index.save()
    dataset = Dataset(list(source.classes), images, skipped, reader=LibraryReader(source))
    check_class_sizes(dataset, config.data.min_images_per_class)
    return dataset


class LibraryReader:
    """Encoded image bytes of a library dataset's records, for extraction (see Dataset.reader)."""

    def __init__(self, source: LibrarySource):
        self.source = source

    def __call__(self, records: list[ImageRecord]):
        """A tf.data.Dataset of (encoded bytes, position in `records`), in increasing position."""
        locators = []
        for r in records:
            split, _, index = r.relpath.rpartition("/")
            locators.append((split, int(index)))
        return self.source.pipeline(locators)


def ordered_groups(locators: list[tuple[str, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Locators as runs of one split with increasing indexes: [(split, [(index, position), ...]), ...], in
    position order, so each run is read by one pass over its split."""
    groups: list[tuple[str, list[tuple[int, int]]]] = []
    for position, (split, index) in enumerate(locators):
        if groups and groups[-1][0] == split and groups[-1][1][-1][0] < index:
            groups[-1][1].append((index, position))
        else:
            groups.append((split, [(index, position)]))
    return groups
