"""Images named by a label file (data.labels = FILE.csv): one row per image, an image column (a path relative to
data.dir, a file name, or an id without its extension matched to one file), a label column and, optionally, a
split column; other columns are ignored. The columns are found from the header, or named by data.labels_columns.

One label per image: a row with several labels, or an image on rows with different labels, is refused
(multi-label classification is out of scope); so is a label column that looks like an id. No TensorFlow here.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path, PurePosixPath

from runner.data.layout import Candidate, Listing, _listed
from runner.data.scan import image_entries
from runner.data.splits import canonical_split
from runner.errors import DataError

log = logging.getLogger("runner")

IMAGE_COLUMNS = ("image", "image_path", "image_name", "image_file", "file", "filename", "file_name", "filepath",
                 "file_path", "path", "img", "image_id", "id")   # in order of preference
LABEL_COLUMNS = ("label", "class", "category", "class_name", "classname", "label_name", "category_name", "breed",
                 "species", "target", "labels")
SPLIT_COLUMNS = ("split", "subset")
MULTI_LABEL_SEPARATORS = (";", "|", ",")
ID_LIKE_SHARE = 0.9      # a label column with a distinct value on more than this share of rows is an id
ID_LIKE_MIN_ROWS = 10
SETTING = "data.labels_columns"


def labels_path(data_dir: Path, labels: str) -> Path:
    """data.labels as a file: absolute, or relative to data.dir."""
    path = Path(labels).expanduser()
    path = path if path.is_absolute() else data_dir / path
    if not path.is_file():
        raise DataError(f"data.labels {labels}: no such file ({path}; a relative path is taken from data.dir). "
                        f"Point data.labels at the CSV file that names each image's class.")
    return path


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, row)]) of a CSV (or TSV) file in UTF-8, a byte-order mark allowed; blank lines
    are passed over."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"data.labels {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV.") from None
    first = text.split("\n", 1)[0]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else max(",;\t", key=first.count)
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as e:
        raise DataError(f"data.labels {path} is not a readable CSV file ({e}); fix the file.") from None
    if not rows:
        raise DataError(f"data.labels {path} is empty; it needs a header (e.g. image,label) and one row per image.")
    return [name.strip() for name in rows[0][1]], rows[1:]


def choose_columns(header: list[str], setting: str, path: Path) -> tuple[int, int, int | None]:
    """(image, label, split or None) column indexes: named by data.labels_columns ("image,label[,split]"), else
    found from the header."""
    lower = [name.lower() for name in header]
    shown = ", ".join(repr(n) for n in header)
    if setting:
        names = [n.strip().lower() for n in setting.split(",") if n.strip()]
        unknown = [n for n in names if n not in lower]
        if len(names) not in (2, 3) or unknown:
            raise DataError(f"{SETTING} = {setting!r}: give the image column, the label column and optionally the "
                            f"split column of {path.name}, comma-separated"
                            + (f"; {', '.join(map(repr, unknown))} not in its header ({shown})" if unknown else "")
                            + ".")
        indexes = [lower.index(n) for n in names]
        return indexes[0], indexes[1], indexes[2] if len(indexes) == 3 else None
    image = next((lower.index(n) for n in IMAGE_COLUMNS if n in lower), None)
    label = next((lower.index(n) for n in LABEL_COLUMNS if n in lower and lower.index(n) != image), None)
    if label is None and image is not None and len(header) == 2:  # two columns: the other one is the label
        label = 1 - image
    if image is None or label is None:
        missing = "image" if image is None else "label"
        raise DataError(f"data.labels {path}: no {missing} column found in its header ({shown}); name the columns "
                        f"with {SETTING} = 'IMAGE_COLUMN,LABEL_COLUMN' (e.g. 'id,breed').")
    split = next((lower.index(n) for n in SPLIT_COLUMNS if n in lower), None)
    return image, label, split


class FileIndex:
    """The image files below data.dir, found by relative path, by file name, or by name without extension."""

    def __init__(self, data_dir: Path, found):
        self.data_dir = data_dir
        self.by_path = {"/".join(parts): (parts, entry) for parts, entry in found}
        self.by_name: dict[str, list[str]] = {}
        self.by_stem: dict[str, list[str]] = {}
        for relpath in self.by_path:
            name = relpath.rsplit("/", 1)[-1]
            self.by_name.setdefault(name, []).append(relpath)
            self.by_stem.setdefault(name.rsplit(".", 1)[0], []).append(relpath)

    def find(self, value: str, base: str) -> tuple[str | None, str]:
        """(relative path, '') of the one file `value` names, or (None, why not). `base`: the label file's
        folder relative to data.dir, where a relative path may also start."""
        value = value.strip().replace("\\", "/")
        path = PurePosixPath(value)
        if path.is_absolute():
            try:
                value = path.relative_to(self.data_dir).as_posix()
            except ValueError:
                return None, "not below data.dir"
        value = value.removeprefix("./")
        for relpath in (value, f"{base}/{value}" if base else value):
            if relpath in self.by_path:
                return relpath, ""
        for table, key in ((self.by_name, PurePosixPath(value).name), (self.by_stem, PurePosixPath(value).name)):
            matches = table.get(key, [])
            if len(matches) == 1:
                return matches[0], ""
            if len(matches) > 1:
                return None, f"matches {len(matches)} files ({', '.join(matches[:3])}): give its path in data.dir"
        return None, "no such image file below data.dir"


def list_labelled_images(data_dir: Path, labels: str, labels_columns: str, skipped: list[dict]) -> Listing:
    """The images the label file names, each with its label and own split (if it has a split column)."""
    path = labels_path(data_dir, labels)
    header, rows = read_rows(path)
    image_col, label_col, split_col = choose_columns(header, labels_columns, path)
    files = FileIndex(data_dir, image_entries(data_dir, (), skipped))
    try:
        base = path.parent.resolve().relative_to(data_dir).as_posix()
    except ValueError:
        base = ""
    base = "" if base == "." else base
    name = path.name
    labelled = [(n, row) for n, row in rows if len(row) > max(image_col, label_col) and row[label_col].strip()]
    unlabelled = len(rows) - len(labelled)
    all_labels = {row[label_col].strip() for _, row in labelled}
    _refuse_id_column(len(labelled), len(all_labels), header[label_col], path)
    chosen: dict[str, tuple[str, str | None, int]] = {}   # relpath → (label, own split, row number)
    missing, bad_splits = [], {}
    for n, row in labelled:
        label, value = row[label_col].strip(), row[image_col]
        _refuse_several_labels(label, all_labels, value, n, name)
        own_split = None
        if split_col is not None:
            raw = row[split_col].strip() if len(row) > split_col else ""
            own_split = canonical_split(raw) if raw else None
            if own_split is None:
                bad_splits.setdefault(raw, n)
        relpath, why = files.find(value, base)
        if relpath is None:
            missing.append({"path": value.strip(), "reason": f"{name} row {n}: {why}"})
            continue
        if relpath in chosen and chosen[relpath][0] != label:
            other = chosen[relpath]
            raise DataError(f"{name} rows {other[2]} and {n} give {relpath!r} two labels ({other[0]!r}, {label!r}): "
                            f"multi-label classification is out of scope; give each image one label.")
        chosen[relpath] = (label, own_split, n)
    if bad_splits:
        raise DataError(f"{name}: column {header[split_col]!r} holds {_listed(bad_splits)} (row "
                        f"{min(bad_splits.values())}), not a split name (train, validation/val/valid/dev, "
                        f"test); fix those rows, or set {SETTING} = '{header[image_col]},{header[label_col]}' to "
                        f"ignore the split column.")
    _report(missing, unlabelled, len(files.by_path) - len(chosen), name, skipped)
    classes = sorted({label for label, _, _ in chosen.values()})
    if len(classes) < 2:
        raise DataError(f"data.labels {path} names {len(classes)} class(es) for the images it finds; a classifier "
                        f"needs at least 2.")
    candidates = [Candidate(label, own_split, files.by_path[relpath][0], files.by_path[relpath][1])
                  for relpath, (label, own_split, _) in sorted(chosen.items(), key=lambda c: (c[1][0], c[0]))]
    split_name = f", split column {header[split_col]!r}" if split_col is not None else ""
    detail = f"{name}: image column {header[image_col]!r}, label column {header[label_col]!r}{split_name}"
    own = frozenset(split for _, split, _ in chosen.values() if split)
    return Listing("labels", detail, classes, candidates, own)


def _refuse_id_column(rows: int, distinct: int, column: str, path: Path) -> None:
    if rows >= ID_LIKE_MIN_ROWS and distinct > ID_LIKE_SHARE * rows:
        raise DataError(f"data.labels {path}: the label column {column!r} has a distinct value on {distinct} of "
                        f"{rows} rows: this looks like an id, not a label: set {SETTING} = "
                        f"'IMAGE_COLUMN,LABEL_COLUMN' to name the column that holds each image's class.")


def _refuse_several_labels(label: str, all_labels: set[str], image: str, row: int, name: str) -> None:
    """A label cell holding a list ('cat;dog', 'cat dog' where 'cat' is itself a label) is refused."""
    parts = [label]
    for separator in MULTI_LABEL_SEPARATORS:
        if separator in label:
            parts = [p.strip() for p in label.split(separator) if p.strip()]
            break
    else:
        words = label.split()
        if len(words) > 1 and any(word in all_labels for word in words):
            parts = words
    if len(parts) > 1:
        raise DataError(f"{name} row {row} gives {image.strip()!r} several labels ({', '.join(map(repr, parts))}): "
                        f"multi-label classification is out of scope; give each image one label.")


def _report(missing: list[dict], unlabelled: int, without_row: int, name: str, skipped: list[dict]) -> None:
    """Log what the label file and the folder do not agree on; rows naming missing files go to `skipped`."""
    if missing:
        shown = "; ".join(f"{m['path']} ({m['reason']})" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        log.warning("%d row(s) of %s name no usable image and are skipped: %s%s", len(missing), name, shown, more)
        skipped.extend(missing)
    if unlabelled:
        log.info("%d row(s) of %s have no label and are ignored", unlabelled, name)
    if without_row:
        log.info("%d image file(s) below data.dir have no labelled row in %s and are ignored", without_row, name)
