"""`data.dir = "hf:PATH[@REVISION][:CONFIG]"`: a Hugging Face dataset, from the Hub (`hf:beans`, `hf:user/name`)
through `datasets`' own cache (HF_HOME / HF_DATASETS_CACHE; HF_TOKEN for gated sets; HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE for cached sets without network), or a local folder (written by `save_to_disk`, or holding
parquet / imagefolder files). The Image column is read undecoded (`Image(decode=False)`: its stored bytes)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

from runner.data.libraries import (Example, HF_PREFIX, LibraryUnavailable, is_unreachable, missing_library,
                                   ordered_groups)
from runner.errors import DataError

log = logging.getLogger("runner")

BATCH = 256
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """(path or Hub id, revision, config) of "hf:PATH[@REVISION][:CONFIG]"."""
    rest = spec[len(HF_PREFIX):].strip()
    path, config = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail and "/" not in tail:
        path, config = head, tail
    revision = None
    if "@" in path and not Path(path).expanduser().exists():
        path, _, revision = path.rpartition("@")
    return path, revision or None, config


def is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().is_dir()


def open_hf(spec: str, image_key: str = "", label_key: str = "") -> "HfSource":
    """The dataset `spec` names, loaded (from the Hub into datasets' cache when needed) as its splits."""
    logging.getLogger("datasets").setLevel(logging.WARNING)  # not its import-time notes ("TensorFlow available")
    try:
        import datasets
    except ImportError as e:
        raise missing_library(spec, "datasets", e) from None
    path, revision, config = parse(spec)
    if not path:
        raise DataError(f"data.dir {spec!r} names no dataset; write hf:NAME (a Hub id such as hf:beans) or "
                        f"hf:/path/to/folder.")
    try:
        loaded = _load(datasets, spec, path, revision, config)
    except DataError:
        raise
    except Exception as e:
        raise _load_error(spec, path, e) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    where = f"{path}" + (f"@{revision}" if revision else "") + (f", config {config}" if config else "")
    return HfSource(spec, loaded, where, *columns(datasets, spec, loaded, image_key, label_key))


def _load(datasets, spec: str, path: str, revision: str | None, config: str | None):
    if is_local(path):
        folder = Path(path).expanduser()
        if not folder.exists():
            raise DataError(f"data.dir {spec}: {folder} does not exist; point hf: at a folder written by "
                            f"save_to_disk, or holding parquet / imagefolder files, or at a Hub id (hf:beans).")
        if any((folder / marker).is_file() for marker in SAVED_MARKERS):
            return datasets.load_from_disk(str(folder))
        return datasets.load_dataset(str(folder), config)
    return datasets.load_dataset(path, config, revision=revision)


def _load_error(spec: str, path: str, e: Exception) -> Exception:
    """The error to raise for a dataset that could not be loaded: not found or gated (exit 2), the Hub
    unreachable (exit 75), anything else the library refused (exit 2, its message kept)."""
    name = type(e).__name__
    if name == "GatedRepoError" or "gated" in str(e).lower():
        return DataError(f"data.dir {spec}: {path} is a gated dataset; accept its terms on "
                         f"https://huggingface.co/datasets/{path} and set HF_TOKEN to a token of that account.")
    if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError", "EmptyDatasetError"):
        return DataError(f"data.dir {spec}: no dataset {path!r} ({str(e).splitlines()[0] if str(e) else name}). "
                         f"Check the id on https://huggingface.co/datasets (hf:OWNER/NAME, e.g. hf:beans), or point "
                         f"hf: at a local folder; a private dataset needs HF_TOKEN.")
    if is_unreachable(e):
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (" Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the dataset is not in the cache: "
                "run once with network." if offline else " Run the same command again.")
        return LibraryUnavailable(f"data.dir {spec}: the Hugging Face Hub could not be reached "
                                  f"({name}: {str(e).splitlines()[0] if str(e) else ''}).{hint}")
    if isinstance(e, ValueError):  # e.g. "Config name is missing", with the configs to choose from
        return DataError(f"data.dir {spec}: datasets could not load {path!r}: {e} (a config is chosen with "
                         f"hf:{path}:CONFIG).")
    return e


def columns(datasets, spec: str, loaded, image_key: str, label_key: str) -> tuple[str, str]:
    """(Image column, ClassLabel column): the ones set, else the only one of each kind (or the one named
    image / label)."""
    features = next(iter(loaded.values())).features
    image_key = image_key or _pick(spec, features, datasets.Image, ("image", "img"), "data.image_key")
    label_key = label_key or _pick(spec, features, datasets.ClassLabel, ("label", "labels"), "data.label_key")
    for key, kind, setting in ((image_key, datasets.Image, "data.image_key"),
                               (label_key, datasets.ClassLabel, "data.label_key")):
        if not isinstance(features.get(key), kind):
            raise DataError(f"data.dir {spec}: {setting} = {key!r} is not an {kind.__name__} column (the columns: "
                            f"{_listing(features)}); set {setting} to one that is" +
                            (" (a column of label names becomes one with dataset.class_encode_column(name))."
                             if kind is datasets.ClassLabel else "."))
    return image_key, label_key


def _pick(spec: str, features, kind, usual: tuple[str, ...], setting: str) -> str:
    candidates = [key for key, feature in features.items() if isinstance(feature, kind)]
    for name in usual:
        if name in candidates:
            return name
    if len(candidates) == 1:
        return candidates[0]
    what = "no" if not candidates else f"several ({', '.join(candidates)})"
    raise DataError(f"data.dir {spec}: the dataset has {what} {kind.__name__} column(s) (the columns: "
                    f"{_listing(features)}); set {setting} to the one to use.")


def _listing(features) -> str:
    return ", ".join(f"{key} ({type(feature).__name__})" for key, feature in features.items())


class HfSource:
    """A loaded Hugging Face dataset: its classes, splits, and its rows' encoded image bytes."""

    def __init__(self, spec: str, loaded, where: str, image_key: str, label_key: str):
        import datasets
        self.spec, self.image_key, self.label_key = spec, image_key, label_key
        self.parts = {name: split.select_columns([image_key, label_key])
                      .cast_column(image_key, datasets.Image(decode=False)) for name, split in loaded.items()}
        self.classes = list(next(iter(loaded.values())).features[label_key].names)
        self.splits = {name: len(split) for name, split in self.parts.items()}
        self.description = f"Hugging Face dataset {where}, Image column {image_key!r}, labels {label_key!r}"

    def _bytes(self, value) -> tuple[bytes | None, str | None]:
        """The encoded bytes of an undecoded Image value ({"bytes", "path"}), or why there are none."""
        if not value:
            return None, "no image"
        if value.get("bytes") is not None:
            return value["bytes"], None
        path = value.get("path")
        try:
            return Path(path).read_bytes(), None
        except (OSError, TypeError) as e:
            return None, f"the image's file {path!r} could not be read ({getattr(e, 'strerror', None) or e})"

    def examples(self, split: str) -> Iterator[Example]:
        part = self.parts[split]
        for start in range(0, len(part), BATCH):
            rows = part[start:start + BATCH]
            for offset, (value, label) in enumerate(zip(rows[self.image_key], rows[self.label_key])):
                data, problem = self._bytes(value)
                yield Example(start + offset, None if label is None else int(label), data, problem)

    def pipeline(self, locators: list[tuple[str, int]]):
        import tensorflow as tf

        def generate():
            for split, wanted in ordered_groups(locators):
                part = self.parts[split]
                for index, position in wanted:
                    data, _ = self._bytes(part[index][self.image_key])
                    yield data or b"", position
        return tf.data.Dataset.from_generator(generate, output_signature=(tf.TensorSpec([], tf.string),
                                                                          tf.TensorSpec([], tf.int64)))
