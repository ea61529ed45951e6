"""labels.txt: the class names in the model's output order, one a line, always UTF-8 (never the locale's
encoding: a class named "Äpfel" must read back the same on a machine whose locale is ASCII or cp1252)."""
from __future__ import annotations

from pathlib import Path

LABELS_FILE = "labels.txt"


def write_labels(folder: Path, classes: list[str]) -> Path:
    """Write folder/labels.txt for `classes`; returns its path."""
    path = Path(folder) / LABELS_FILE
    path.write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    return path


def read_labels(folder: Path) -> list[str]:
    """The class names of folder/labels.txt, in order."""
    return (Path(folder) / LABELS_FILE).read_text(encoding="utf-8").splitlines()
