"""What resume.py's process imports at start: TensorFlow and keras, not keras' optional extras."""
from __future__ import annotations

import re
import subprocess
import sys

from runner.tf_quiet import KERAS_EXTRAS
from tests.helpers import REPO, child_env


def imported_modules(importtime_output: str) -> set[str]:
    """Names of the modules `python -X importtime` reports as loaded (a blocked import reports no submodule)."""
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", importtime_output, re.MULTILINE))


def test_resume_py_loads_tensorflow_without_the_extras_keras_would_import(tmp_path):
    # a missing data folder is found after TensorFlow is imported, so this start costs no training
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "resume.py"),
                             "--config", str(REPO / "configs" / "clothing_local.toml"),
                             "--set", f"run.dir={tmp_path / 'run'}", "--set", f"data.dir={tmp_path / 'nothing'}"],
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "data.dir" in result.stderr
    modules = imported_modules(result.stderr)
    assert "tensorflow" in modules and "keras.src.models" in modules, \
        "the error must come after TensorFlow and keras loaded, or this tests nothing"
    for extra in KERAS_EXTRAS:
        assert not {m for m in modules if m.startswith(extra + ".")}, f"{extra} was imported"
    assert "scipy.stats" not in modules
