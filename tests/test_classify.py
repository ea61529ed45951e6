"""classify: an export folder or snapshot archive + image files → class names and probabilities."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import CLOTHING, REPO, child_env


def first_image(class_name: str) -> Path:
    return sorted((CLOTHING / class_name).glob("*.jpg"))[0]


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Two good photos, a truncated JPEG, a JPEG with garbage after its header, and a text file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    hat, shoes = first_image("hat").read_bytes(), first_image("shoes").read_bytes()
    (folder / "hat.jpg").write_bytes(hat)
    (folder / "shoes.jpg").write_bytes(shoes)
    (folder / "truncated.jpg").write_bytes(hat[:len(hat) // 3])
    (folder / "garbage.jpg").write_bytes(hat[:4] + bytes(range(256)) * 20)
    (folder / "notes.txt").write_text("not a photo\n")
    return folder


def run_classify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.classify", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def test_mixed_folder_classifies_the_good_images_and_reports_each_bad_file(exported_run, mixed_folder):
    result = run_classify(str(exported_run[2]), str(mixed_folder), "--top-k", "3")
    assert result.returncode == 0, result.stderr
    out, err = result.stdout, result.stderr
    assert f"{mixed_folder / 'hat.jpg'}\n  hat " in out
    assert f"{mixed_folder / 'shoes.jpg'}\n  shoes " in out
    assert out.count("%") == 6, out  # top 3 of each of the two good images
    assert f"error: {mixed_folder / 'truncated.jpg'}: corrupt or truncated image" in err
    assert f"error: {mixed_folder / 'garbage.jpg'}: corrupt or truncated image" in err
    assert f"error: {mixed_folder / 'notes.txt'}: not an image" in err


def test_only_bad_files_exit_with_nothing_to_do_not_a_crash(exported_run, mixed_folder, capsys):
    from common.errors import EXIT_NO_INPUT
    from runner.export.classify import main
    bad = [str(mixed_folder / name) for name in ("truncated.jpg", "notes.txt", "missing.jpg")]
    assert main([str(exported_run[2]), *bad]) == EXIT_NO_INPUT != 1  # 1 would make --supervise retry
    err = capsys.readouterr().err
    assert "none of the 3 file(s) could be classified" in err
    assert "missing.jpg: cannot read the file" in err


def test_snapshot_archive_and_json_output(exported_run, tmp_path, capsys):
    from runner.export.classify import main
    archive = tmp_path / "snapshot-step-4000.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(exported_run[2], arcname="run/export")
        tar.add(exported_run[0] / "summary.json", arcname="run/summary.json")
    assert main([str(archive), str(first_image("pants")), "--json", "--top-k", "2"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["path"] == str(first_image("pants"))
    assert [p["class"] for p in result["predictions"]][0] == "pants"
    assert len(result["predictions"]) == 2
    assert result["predictions"][0]["probability"] >= result["predictions"][1]["probability"]


def test_a_run_folder_is_accepted_as_model(exported_run, capsys):
    from runner.export.classify import main
    assert main([str(exported_run[0]), str(first_image("shoes")), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "shoes"


def test_archive_with_a_path_escaping_the_folder_is_refused(tmp_path):
    from runner.export.classify import extract_archive
    from runner.errors import RunnerError
    evil = tmp_path / "evil.tar.gz"
    (tmp_path / "payload").write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(tmp_path / "payload", arcname="../escaped")
    with pytest.raises(RunnerError, match="not a readable .tar.gz snapshot"):
        extract_archive(evil, tmp_path / "into")
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("model, message", [
    ("drive:my-runs", "no Google credentials were found"),  # drive:FOLDER itself: tests/sync/test_end_to_end.py
    ("no/such/folder", "neither an export folder nor a .tar.gz snapshot"),
])
def test_unusable_model_argument_gets_a_clear_error(model, message, capsys):
    from runner.export.classify import main
    assert main([model, str(first_image("hat"))]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_an_export_points_to_runner_export(tmp_path, capsys):
    from runner.export.classify import main
    assert main([str(tmp_path), str(first_image("hat"))]) == 2
    assert "python -m runner.export --run RUN_DIR" in capsys.readouterr().err


def test_non_ascii_class_names_are_read_as_utf8_under_a_locale_that_is_not(exported_run, tmp_path):
    """labels.txt is UTF-8 whatever the locale: under an ASCII locale "Äpfel" is read back, printed as JSON,
    and the text output escapes what the terminal cannot show instead of crashing."""
    import os
    import shutil
    from runner.export.labels import read_labels
    export = tmp_path / "export"
    shutil.copytree(exported_run[2], export)
    classes = read_labels(export)
    renamed = ["Äpfel" if name == "hat" else name for name in classes]
    (export / "labels.txt").write_bytes("".join(f"{n}\n" for n in renamed).encode("utf-8"))
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONIOENCODING", "LANG", "LC_CTYPE")}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    photo = str(first_image("hat"))
    for output in (["--json"], []):
        result = subprocess.run([sys.executable, "-m", "runner.classify", str(export), photo, *output], cwd=REPO,
                                env=env, capture_output=True, timeout=300)
        assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
        if output:
            top = json.loads(result.stdout)[0]["predictions"][0]["class"]
            assert top == "Äpfel"
        else:
            assert b"\\xc4pfel" in result.stdout, result.stdout
