"""GPU memory growth is on by default before TensorFlow loads, and the log names the extraction/training device."""
from __future__ import annotations

import logging
import subprocess
import sys

from tests.helpers import REPO, child_env

CHECK_GROWTH = ("import os, sys; import resume; "
                "print(os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH'), 'tensorflow' in sys.modules)")


def growth_after_importing_resume(value: str | None) -> str:
    """TF_FORCE_GPU_ALLOW_GROWTH once resume.py is imported (given `value` before), and whether TF was loaded."""
    env = child_env()
    env.pop("TF_FORCE_GPU_ALLOW_GROWTH", None)
    if value is not None:
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = value
    result = subprocess.run([sys.executable, "-c", CHECK_GROWTH], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True, timeout=120, check=True)
    return result.stdout.strip()


def test_resume_turns_on_gpu_memory_growth_before_tensorflow_is_imported():
    assert growth_after_importing_resume(None) == "true False"


def test_an_explicit_memory_growth_setting_is_kept():
    assert growth_after_importing_resume("false") == "false False"


def test_the_log_names_the_device_extraction_and_training_run_on(caplog):
    import tensorflow as tf
    from runner.features.distribute import log_devices
    with caplog.at_level(logging.INFO, logger="runner"):
        log_devices("default")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
        assert f"extraction and training run on {name} (default strategy" in caplog.text
    else:
        assert "extraction and training run on the CPU: TensorFlow sees no GPU" in caplog.text
