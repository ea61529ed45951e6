"""`data.dir = "tfds:NAME"`: a TensorFlow Datasets dataset (`tf_flowers`, `cats_vs_dogs`, `name/config:version`),
downloaded and prepared by TFDS itself into its data dir (TFDS_DATA_DIR, default ~/tensorflow_datasets). Its image
feature is read with TFDS's decoding skipped: the stored JPEG/PNG bytes, decoded later like a file's."""
from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np

from runner.data.libraries import (Example, LibraryUnavailable, TFDS_PREFIX, is_unreachable, missing_library,
                                   ordered_groups)
from runner.errors import DataError

log = logging.getLogger("runner")

CATALOG = "https://www.tensorflow.org/datasets/catalog/overview"


def open_tfds(spec: str, image_key: str = "", label_key: str = "") -> "TfdsSource":
    """The prepared dataset `spec` ("tfds:NAME") names; prepared first if it is not in TFDS's data dir yet."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise missing_library(spec, "tensorflow-datasets", e) from None
    name = spec[len(TFDS_PREFIX):].strip()
    if not name:
        raise DataError(f"data.dir {spec!r} names no dataset; write tfds:NAME, e.g. tfds:tf_flowers (see {CATALOG}).")
    try:
        builder = tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR") or None)  # read now, not at import
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else name
        raise DataError(f"data.dir {spec}: TensorFlow Datasets has no dataset {name!r} ({first}). Use a name from "
                        f"its catalog ({CATALOG}), e.g. tfds:tf_flowers, tfds:cats_vs_dogs, or NAME/CONFIG:VERSION."
                        ) from None
    except Exception as e:
        if is_unreachable(e):
            raise LibraryUnavailable(f"data.dir {spec}: TensorFlow Datasets could not reach its servers ({e}); "
                                     f"run the same command again.") from None
        raise DataError(f"data.dir {spec}: TensorFlow Datasets could not open {name!r} ({type(e).__name__}: "
                        f"{e}). Check the name, config and version against {CATALOG}.") from None
    if not builder.is_prepared():
        log.info("data.dir %s: TensorFlow Datasets downloads and prepares it into %s (once)", spec,
                 builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as e:
            if is_unreachable(e):
                raise LibraryUnavailable(f"data.dir {spec}: the download failed ({type(e).__name__}: {e}); what "
                                         f"TensorFlow Datasets downloaded is kept; run the same command "
                                         f"again.") from None
            if "manual" in str(e).lower():
                raise DataError(f"data.dir {spec}: this dataset must be downloaded by hand ({e}).") from None
            raise
    return TfdsSource(spec, builder, *features(spec, builder, image_key, label_key))


def features(spec: str, builder, image_key: str, label_key: str) -> tuple[str, str]:
    """(image feature, label feature) of the dataset: the ones set, else its supervised keys, else the only
    Image / ClassLabel feature (or the one named image / label)."""
    import tensorflow_datasets as tfds
    info = builder.info
    top = dict(info.features.items())
    supervised = tuple(info.supervised_keys or ()) if isinstance(info.supervised_keys, (tuple, list)) else ()
    image_key = image_key or _pick(spec, top, tfds.features.Image, supervised[:1], "image", "data.image_key")
    label_key = label_key or _pick(spec, top, tfds.features.ClassLabel, supervised[1:2], "label", "data.label_key")
    for key, kind, setting in ((image_key, tfds.features.Image, "data.image_key"),
                               (label_key, tfds.features.ClassLabel, "data.label_key")):
        if not isinstance(top.get(key), kind):
            raise DataError(f"data.dir {spec}: {setting} = {key!r} is not an {kind.__name__} feature of the "
                            f"dataset (its features: {_listing(top)}); set {setting} to one that is.")
    return image_key, label_key


def _pick(spec: str, top: dict, kind, supervised: tuple, usual: str, setting: str) -> str:
    candidates = [key for key, feature in top.items() if isinstance(feature, kind)]
    for choice in (list(supervised), [usual]):
        if choice and choice[0] in candidates:
            return choice[0]
    if len(candidates) == 1:
        return candidates[0]
    what = "none" if not candidates else f"several ({', '.join(candidates)})"
    raise DataError(f"data.dir {spec}: the dataset has {what} {kind.__name__} feature(s) (its features: "
                    f"{_listing(top)}); set {setting} to the one to use" +
                    (", or use a dataset with class labels." if not candidates else "."))


def _listing(top: dict) -> str:
    return ", ".join(f"{key} ({type(feature).__name__})" for key, feature in top.items())


class _OwnDeprecation(logging.Filter):
    """TFDS's partial decoding warns about its own use of a deprecated field; nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "FeatureConnector.dtype" not in record.getMessage()


OWN_DEPRECATION = _OwnDeprecation()


class TfdsSource:
    """A prepared TFDS dataset: its classes, splits, and its examples' encoded image bytes."""

    def __init__(self, spec: str, builder, image_key: str, label_key: str):
        self.spec, self.builder, self.image_key, self.label_key = spec, builder, image_key, label_key
        logging.getLogger("absl").addFilter(OWN_DEPRECATION)  # the same object: added once
        info = builder.info
        self.classes = list(info.features[label_key].names)
        self.splits = {name: int(split.num_examples) for name, split in info.splits.items()}
        self.description = (f"TensorFlow Datasets {info.full_name} in {builder.data_dir}, image feature "
                            f"{image_key!r}, labels {label_key!r}")

    def _split(self, split: str):
        """The split's (image bytes, label) pairs, TFDS's decoding skipped, in TFDS's stable order."""
        import tensorflow_datasets as tfds
        decoders = tfds.decode.PartialDecoding({self.image_key: True, self.label_key: True},
                                               decoders={self.image_key: tfds.decode.SkipDecoding()})
        ds = self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                     read_config=tfds.ReadConfig(try_autocache=False))
        return ds.map(lambda ex: (ex[self.image_key], ex[self.label_key]))

    def examples(self, split: str) -> Iterator[Example]:
        import tensorflow as tf
        index = 0
        try:
            for data, label in self._split(split).as_numpy_iterator():
                yield Example(index, int(label), bytes(data))
                index += 1
        except tf.errors.OpError as e:  # a damaged prepared file: TFDS prepares it again once it is gone
            raise DataError(f"data.dir {self.spec}: split {split!r} could not be read after {index} examples "
                            f"({e.message.splitlines()[0] if e.message else type(e).__name__}); delete "
                            f"{self.builder.data_dir} and run again to have TensorFlow Datasets prepare it "
                            f"again.") from None

    def pipeline(self, locators: list[tuple[str, int]]):
        import tensorflow as tf
        result = None
        for split, wanted in ordered_groups(locators):
            positions = np.full(self.splits[split], -1, np.int64)
            for index, position in wanted:
                positions[index] = position
            table = tf.constant(positions)
            last = wanted[-1][0]
            part = (self._split(split).take(last + 1).enumerate()
                    .filter(lambda i, pair, table=table: table[i] >= 0)
                    .map(lambda i, pair, table=table: (pair[0], table[i])))
            result = part if result is None else result.concatenate(part)
        return result if result is not None else _empty()


def _empty():
    import tensorflow as tf
    return tf.data.Dataset.from_tensor_slices((tf.constant([], tf.string), tf.constant([], tf.int64)))
