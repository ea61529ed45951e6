"""The Colab quickstart is valid nbformat and its cells run end to end here (folder sync backend)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import nbformat

from tests.helpers import CLOTHING, REPO, child_env

NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"


def test_notebook_is_valid_nbformat_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert len(code) >= 6 and all(not c.outputs for c in code)


def test_notebook_cells_run_end_to_end_against_the_folder_backend(shared_assets, tmp_path):
    data = tmp_path / "photos"
    for name in ("hat", "pants", "shoes"):
        (data / name).mkdir(parents=True)
        for src in sorted((CLOTHING / name).glob("*.jpg"))[:14]:
            shutil.copy(src, data / name / src.name)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(c.source for c in notebook.cells if c.cell_type == "code"))
    env = dict(child_env(), QUICKSTART_CONFIG="configs/clothing_local.toml", QUICKSTART_DATA_DIR=str(data),
               QUICKSTART_RUN_DIR=str(tmp_path / "run"), QUICKSTART_SYNC_FOLDER=str(tmp_path / "drive"),
               QUICKSTART_SETTINGS="train.steps=40 eval.every_steps=20 train.progress=lines "
                                   "data.min_images_per_class=3")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=900)
    assert result.returncode == 0, result.stdout
    assert "3 classes: hat, pants, shoes" in result.stdout
    assert "test accuracy" in result.stdout
    assert (tmp_path / "run" / "report" / "curves.png").stat().st_size > 1000
    assert any(name in result.stdout for name in ("hat", "pants", "shoes"))  # the classify cell's output
    assert any((tmp_path / "drive").rglob("*")), "a snapshot should have reached the sync folder"
