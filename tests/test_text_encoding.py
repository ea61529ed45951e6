"""Every text file the project writes or reads is UTF-8, whatever the locale says: a class named "Äpfel"
round-trips through labels.txt on a machine whose locale is ASCII or cp1252."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

SOURCES = ["runner", "sync", "common", "resume.py"]
TEXT_CALLS = {"read_text", "write_text", "open"}


def python_files() -> list[Path]:
    files = []
    for name in SOURCES:
        path = REPO / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def _is_binary(call: ast.Call, name: str) -> bool:
    """Whether an open() / Path.open() call's mode (every string its mode expression can take) is binary."""
    position = 1 if isinstance(call.func, ast.Name) else 0
    mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None and len(call.args) > position:
        mode = call.args[position]
    if mode is None:
        return False
    strings = [n.value for n in ast.walk(mode) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return bool(strings) and all("b" in s for s in strings)


def text_calls_without_encoding(path: Path) -> list[str]:
    """`file:line call` for each text-mode open / read_text / write_text that names no encoding."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name not in TEXT_CALLS:
            continue
        if isinstance(func, ast.Attribute) and name == "open":
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if owner in ("os", "tarfile", "zipfile", "gzip", "Image", "zf", "tar", "bz2", "lzma"):
                continue  # not text files (or not opened by name)
        if name == "open" and _is_binary(node, name):
            continue
        if not any(k.arg == "encoding" for k in node.keywords):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}()")
    return found


def test_every_text_file_is_opened_with_an_explicit_utf8_encoding():
    missing = [hit for path in python_files() for hit in text_calls_without_encoding(path)]
    assert not missing, "text files opened in the locale's encoding:\n" + "\n".join(missing)


def ascii_locale_env() -> dict:
    """An environment whose locale encoding is ASCII: no UTF-8 mode, no C-locale coercion."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LC_CTYPE")}
    return dict(env, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=str(REPO))


def test_the_locale_of_the_test_child_is_really_not_utf8():
    out = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                         env=ascii_locale_env(), capture_output=True, text=True, check=True).stdout
    assert "utf" not in out.lower(), out


def test_labels_with_non_ascii_class_names_round_trip_under_an_ascii_locale(tmp_path):
    """The exporter's labels.txt writer and the classifier's reader, run in a child whose locale is ASCII."""
    script = (
        "import sys; from pathlib import Path\n"
        "from runner.export.labels import write_labels, read_labels\n"
        "names = ['\\u00c4pfel', 'Birnen', 'K\\u00fcrbis']  # escaped: argv is decoded as ASCII here\n"
        "folder = Path(sys.argv[1]); write_labels(folder, names)\n"
        "print(read_labels(folder) == names)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=ascii_locale_env(),
                            capture_output=True, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert result.stdout.strip() == b"True"
    assert (tmp_path / "labels.txt").read_bytes() == "Äpfel\nBirnen\nKürbis\n".encode("utf-8")
