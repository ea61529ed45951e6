"""What data.dir holds: class folders (`DATA/<class>/`), pre-split folders (`DATA/<split>/<class>/`), or images
named by a label file (data.labels); each image listed with its class and the dataset's own split, if any.

data.layout = auto tells the folder layouts apart by the top-level folder names: all of them split names
(train/training, validation/val/valid/dev, test/testing) holding class folders → pre-split; none → class
folders; a mix → an error naming the folders and the setting that forces a layout. No TensorFlow here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from runner.data.scan import _identity, _is_dir, _skip, image_entries, is_ignored, list_class_folders, name_problem
from runner.data.splits import SPLITS, canonical_split
from runner.errors import DataError

log = logging.getLogger("runner")

LAYOUTS = ("auto", "classes", "splits")


@dataclass(frozen=True)
class Candidate:
    """One image file found, before its content is checked: its class, its own split, where it is."""
    label: str                 # class name
    own_split: str | None      # train / validation / test as the dataset ships it; None: it has no split
    parts: tuple[str, ...]     # path relative to data.dir
    entry: os.DirEntry


@dataclass(frozen=True)
class Listing:
    """The images of data.dir by class (sorted class names) with the layout that named them."""
    kind: str                  # classes / splits / labels
    detail: str
    classes: list[str]
    candidates: list[Candidate]
    own_splits: frozenset[str]


def list_images(data_dir: Path, layout: str, labels: str, labels_columns: str, skipped: list[dict]) -> Listing:
    """Every image of data_dir with its class and own split, by data.labels if set, else by data.layout."""
    if labels:
        from runner.data.labels import list_labelled_images
        return list_labelled_images(data_dir, labels, labels_columns, skipped)
    split_folders = find_split_folders(data_dir, layout)
    if split_folders:
        return _list_split_folders(data_dir, split_folders, skipped)
    classes = list_class_folders(data_dir, skipped)
    visited = {_identity(data_dir)} | {_identity(data_dir / name) for name in classes}  # links back: not followed
    candidates = [Candidate(name, None, parts, entry) for name in classes
                  for parts, entry in sorted(image_entries(data_dir / name, (name,), skipped, visited),
                                             key=lambda c: c[0])]
    return Listing("classes", "", classes, candidates, frozenset())


def _top_folders(data_dir: Path) -> list[str]:
    if not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} is not a folder; point data.dir at a folder with one "
                        f"sub-folder of images per class.")
    return sorted(p.name for p in data_dir.iterdir()
                  if not is_ignored(p.name) and _is_dir(p) and not name_problem(p.name))


def _has_subfolders(folder: Path) -> bool:
    return any(not is_ignored(p.name) and _is_dir(p) for p in folder.iterdir())


def find_split_folders(data_dir: Path, layout: str) -> dict[str, str]:
    """{split: folder name} for a pre-split tree, {} for class folders (data.layout: auto, classes, splits)."""
    if layout == "classes":
        return {}
    folders = _top_folders(data_dir)
    named = {name: canonical_split(name) for name in folders if canonical_split(name)}
    force = "set data.layout = splits to read only the split folders, or data.layout = classes to take every " \
            "top-level folder as a class"
    if layout == "auto":
        if not named:
            return {}
        others = [name for name in folders if name not in named]
        if others:
            raise DataError(f"data.dir {data_dir} mixes split folders ({_listed(named)}) with other folders "
                            f"({_listed(others)}): is it split into {'/'.join(named)}, or are those classes? "
                            f"Move the other folders out, or {force}.")
        flat = [name for name in named if not _has_subfolders(data_dir / name)]
        if flat:
            raise DataError(f"data.dir {data_dir}: the split folder(s) {_listed(flat)} hold images but no class "
                            f"folders. Put each split's images in one sub-folder per class "
                            f"({flat[0]}/<class>/...), or name each image's class in a label file (data.labels = "
                            f"FILE.csv); if {_listed(flat)} really are class names, set data.layout = classes.")
    elif not named:
        raise DataError(f"data.layout = splits, but data.dir {data_dir} has no split folder (train, validation, "
                        f"test; found: {_listed(folders) or 'none'}); set data.layout = auto or classes.")
    else:
        ignored = [name for name in folders if name not in named]
        if ignored:
            log.warning("data.layout = splits: folder(s) %s of data.dir are not split names and are ignored",
                        _listed(ignored))
    by_split: dict[str, list[str]] = {}
    for name, split in named.items():
        by_split.setdefault(split, []).append(name)
    twice = {split: names for split, names in by_split.items() if len(names) > 1}
    if twice:
        split, names = next(iter(twice.items()))
        raise DataError(f"data.dir {data_dir} has {len(names)} folders for the {split} split ({_listed(names)}); "
                        f"merge them into one.")
    if "train" not in by_split:
        raise DataError(f"data.dir {data_dir} is split into {_listed(named)} but has no train folder (train/ or "
                        f"training/): the head needs training images. Add one, or set data.layout = classes if "
                        f"those folders are classes.")
    return {split: by_split[split][0] for split in SPLITS if split in by_split}


def _list_split_folders(data_dir: Path, split_folders: dict[str, str], skipped: list[dict]) -> Listing:
    """The images of `<split>/<class>/...`; classes are the union over the splits."""
    found: dict[str, list[tuple[str, tuple[str, ...], os.DirEntry]]] = {}
    visited = {_identity(data_dir)} | {_identity(data_dir / f) for f in split_folders.values()}
    for split, folder in split_folders.items():
        root = data_dir / folder
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not is_ignored(entry.name) and not _is_dir(Path(entry.path)) and not name_problem(entry.name):
                _skip(skipped, f"{folder}/{entry.name}", f"not in a class folder of {folder}/; move it into "
                                                         f"{folder}/<class>/")
        for name in list_class_folders(root, skipped, at_least=0):
            visited.add(_identity(root / name))
            for parts, entry in image_entries(root / name, (folder, name), skipped, visited):
                found.setdefault(name, []).append((split, parts, entry))
    classes = sorted(found)
    if len(classes) < 2:
        raise DataError(f"data.dir {data_dir} ({'/, '.join(split_folders.values())}/) has {len(classes)} class "
                        f"folder(s) with images; a classifier needs at least 2 (<split>/<class>/<images>).")
    counts = {name: {split for split, _, _ in items} for name, items in found.items()}
    untrained = [name for name in classes if "train" not in counts[name]]
    if untrained:
        raise DataError(f"class(es) {_listed(untrained)} have no image in the train folder "
                        f"{split_folders['train']}/ (only in {'/'.join(sorted(counts[untrained[0]]))}), so the head "
                        f"could never learn them. Add {split_folders['train']}/{untrained[0]}/ with its images, or "
                        f"remove the class from the other splits.")
    for split in ("validation", "test"):
        missing = [name for name in classes if split in split_folders and split not in counts[name]]
        if missing:
            log.warning("class(es) %s have no image in the %s folder %s/: their %s accuracy is not measured",
                        _listed(missing), split, split_folders[split], split)
    candidates = [Candidate(name, split, parts, entry) for name in classes
                  for split, parts, entry in sorted(found[name], key=lambda c: c[1])]
    detail = ", ".join(f"{folder}/" for folder in split_folders.values())
    return Listing("splits", detail, classes, candidates, frozenset(split_folders))


def _listed(names) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")
