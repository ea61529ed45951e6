"""README's Colab cells, parsed out of README.md, run in sequence in one shell session on the local checkout:
the clone and Colab-only lines are replaced by the checkout, /content by a temporary folder, configs/flowers.toml's
flower_photos URL by a local archive (the download itself is tested in test_sources.py), and the run is made small (local MobileNet weights, few steps, folder sync)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import MOBILENET_WEIGHTS, REPO, child_env, write_photo_archive

README = REPO / "README.md"
FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"


def colab_cells() -> list[str]:
    """The lines of the first ```python block of README's "On Colab" section."""
    section = re.search(r"^## On Colab\b(.*?)^## ", README.read_text(), re.S | re.M)
    assert section, "README has no '## On Colab' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "README's Colab section has no ```python block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def laptop_command() -> str:
    """The one command of README's "From Drive to your laptop" recipe."""
    section = re.search(r"^### From Drive to your laptop\n(.*?)^##", README.read_text(), re.S | re.M)
    assert section, "README has no '### From Drive to your laptop' section"
    (command,) = re.findall(r"```bash\n\s*(.*?)\n\s*```", section.group(1), re.S)
    return command


def as_local_shell(lines: list[str], content: Path, flowers_archive: Path, small_run: str) -> str:
    """README's Colab lines as one bash script for this checkout; an unknown kind of line fails the test."""
    script = ["set -euo pipefail"]
    for line in lines:
        if re.match(r"^REPO_URL = ", line) or "google.colab" in line:
            continue  # Colab-only Python: the repository URL for the clone, the Google sign-in
        if line.startswith("!") and re.search(r"\bgit (clone|pull)\b", line):
            continue  # the clone / pull: this checkout stands in for it
        if line.startswith("%cd /content/bottleneck-runner"):
            script.append(f"cd {REPO}")
            continue
        assert line.startswith("!"), f"README Colab line of unknown kind (update this test): {line}"
        command = line[1:].replace(FLOWERS_URL, flowers_archive.as_uri()).replace("/content", str(content))
        if command.startswith("python resume.py"):
            command += " " + small_run
        script.append(command)
    return "\n".join(script) + "\n"


@pytest.fixture()
def flowers_archive(tmp_path) -> Path:
    """A stand-in for flower_photos.tgz: a flower_photos/ folder of three real clothing classes."""
    return write_photo_archive(tmp_path / "flower_photos.tgz", "flower_photos", 12)


def test_readme_colab_cells_parse_into_known_lines():
    lines = colab_cells()
    assert any(line.startswith("%cd /content/bottleneck-runner") for line in lines)
    assert not any(line.startswith("!cd ") or " && cd " in line for line in lines), "cd in a ! shell does not last"
    assert any(line.startswith("!python resume.py --config configs/flowers.toml") for line in lines)
    assert "not measured here" in README.read_text()
    from runner.run.config import load_config
    assert load_config(REPO / "configs" / "flowers.toml").data.dir == FLOWERS_URL  # the config downloads it


@pytest.mark.slow
def test_readme_colab_cells_run_in_one_shell_session_and_again_after_a_disconnect(shared_assets, flowers_archive,
                                                                                 tmp_path):
    content, drive = tmp_path / "content", tmp_path / "drive"
    content.mkdir()
    small_run = " ".join(f"--set {item}" for item in (
        f"data.dir={flowers_archive}", f"data.unpack_dir={content}/data", f"run.dir={content}/runs/flowers", "backbone.name=mobilenet",
        f"backbone.weights={MOBILENET_WEIGHTS}", "backbone.alpha=0.25", "backbone.image_size=224",
        "train.steps=30", "eval.every_steps=15", "checkpoint.every_steps=15", "data.min_images_per_class=3",
        "sync.backend=folder", f"sync.folder={drive}"))  # no Google account here: the folder backend stands in
    script = tmp_path / "colab.sh"
    script.write_text(as_local_shell(colab_cells(), content, flowers_archive, small_run))

    def run_cells() -> str:
        result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=900)
        assert result.returncode == 0, f"{script.read_text()}\n{result.stdout}"
        return result.stdout

    first = run_cells()
    assert "done: step 30" in first, first
    (photos,) = [p for p in (content / "data").rglob("flower_photos") if p.is_dir()]  # unpacked once, whole
    assert sorted(p.name for p in photos.iterdir() if not p.name.startswith(".")) == ["hat", "pants", "shoes"]
    assert sorted(p.name for p in content.iterdir()) == ["data", "runs"], "a download folder was left behind"
    assert (content / "runs" / "flowers" / "export" / "model.tflite").is_file() and any(drive.iterdir())

    # the laptop recipe: the newest snapshot "downloaded from Drive" and the one command on it
    snapshot = max(drive.rglob("snapshot-*.tar.gz"), key=lambda p: p.name)
    name = r"snapshot-\d{9}-flowers\.tar\.gz"
    command = laptop_command().split()
    assert command[:3] == ["python", "-m", "runner.classify"] and re.search(rf"/{name}$", command[3]), command
    assert re.fullmatch(name, snapshot.name), snapshot.name
    hats = sorted((photos / "hat").glob("*.jpg"))
    local = {command[3]: str(snapshot), "my_photo.jpg": str(hats[0]), "more_photos/": str(hats[0].parent)}
    laptop = subprocess.run([local.get(word, word) for word in command], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert laptop.returncode == 0, laptop.stdout
    assert laptop.stdout.count(str(hats[0])) == 2 and len(re.findall(r"(hat|pants|shoes)\s+\d+\.\d+%", laptop.stdout)) >= 13 * 3

    second = run_cells()  # the same cells again, as after a disconnect
    assert "already finished, nothing changed: step 30" in second, second
    assert "extracting bottlenecks" not in second
