"""Which split an image goes to: the dataset's own split where it has one, the stable hash split otherwise.

A source (class folders, pre-split folders, a label file, and later TFDS or Hugging Face) gives each image a
stable key (its path relative to data.dir) and, if the dataset ships one, its own split; `SplitPlan.assign`
turns the two into train / validation / test. No TensorFlow here.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "training": "train",  # folder or column value (lower case) → split
               "validation": "validation", "val": "validation", "valid": "validation", "dev": "validation",
               "test": "test", "testing": "test"}
MAX_NUM_IMAGES_PER_CLASS = 2 ** 27 - 1  # retrain.py's constant: keeps the split stable as images are added


def canonical_split(name: str) -> str | None:
    """train / validation / test for a split name a dataset uses (case-insensitive), else None."""
    return SPLIT_NAMES.get(name.strip().lower())


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


@dataclass(frozen=True)
class SplitPlan:
    """How images get their split. `own` holds the dataset's own splits (empty: it has none). With its own
    train split, its validation and test images stay where they are, and a split it lacks is carved out of its
    train images by the stable hash (split.validation_percent / split.test_percent of them)."""
    own: frozenset[str]
    validation_percent: float
    test_percent: float

    @property
    def uses_own(self) -> bool:
        """Whether the dataset's own split decides anything (train alone: the hash split, as for class folders)."""
        return "train" in self.own and len(self.own) > 1

    def assign(self, key: str, own_split: str | None) -> str:
        """The split of the image with stable key `key` whose own split is `own_split` (None: it has none)."""
        if not self.uses_own:
            return split_of(key, self.validation_percent, self.test_percent)
        if own_split in ("validation", "test"):
            return own_split
        return split_of(key, 0 if "validation" in self.own else self.validation_percent,
                        0 if "test" in self.own else self.test_percent)

    @property
    def source(self) -> str:
        """hash (the stable hash split), dataset (its own three splits), or dataset+hash (one carved)."""
        if not self.uses_own:
            return "hash"
        return "dataset" if set(SPLITS) <= self.own else "dataset+hash"

    def describe(self) -> str:
        """The split in words, for the log and summary.json."""
        v, t = self.validation_percent, self.test_percent
        if not self.uses_own:
            where = " of the train folder" if self.own == {"train"} else ""
            return f"stable hash split{where} ({v:g} % validation, {t:g} % test)"
        own = " / ".join(s for s in SPLITS if s in self.own)
        carved = [f"{name} = {p:g} % of train by the stable hash" for name, p in (("validation", v), ("test", t))
                  if name not in self.own]
        return f"the dataset's own split ({own}" + (f"; {', '.join(carved)})" if carved else ")")


LAYOUT_NAMES = {"classes": "class folders", "splits": "pre-split folders", "labels": "a label file"}


@dataclass(frozen=True)
class DataLayout:
    """How a dataset is organised (class folders, pre-split folders, a label file), which of its parts were
    read (`detail`: the split folders, the label file and its columns) and how it is split."""
    kind: str
    detail: str
    plan: SplitPlan

    def describe(self) -> str:
        """One line for the log."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"data layout: {LAYOUT_NAMES[self.kind]}{detail}; split: {self.plan.describe()}"

    def to_json(self, own_splits: list[str | None]) -> dict:
        """summary.json's record: layout, split source, and the dataset's own split counts (of the images used)."""
        counts = {name: own_splits.count(name) for name in SPLITS if name in self.plan.own}
        return {"layout": self.kind, "detail": self.detail, "split_source": self.plan.source,
                "split": self.plan.describe(), "dataset_splits": counts}
