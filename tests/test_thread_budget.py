"""The thread budget: set from the cores this process may use, applied before TensorFlow starts."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO, child_env


def test_the_budget_follows_the_core_count():
    from runner.distribute import thread_budget
    for cores in (1, 2, 16):
        budget = thread_budget(cores)
        assert (budget.intra_op, budget.inter_op) == (cores, 2)


def test_resume_py_applies_the_budget_before_tensorflow_starts():
    script = ("from runner.config import TrainConfig\n"
              "from runner.distribute import configure_tensorflow, available_cores\n"
              "configure_tensorflow(TrainConfig())\n"
              "import tensorflow as tf\n"
              "print(available_cores(), tf.config.threading.get_intra_op_parallelism_threads(),\n"
              "      tf.config.threading.get_inter_op_parallelism_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    cores = len(os.sched_getaffinity(0))
    assert out == [str(cores), str(cores), "2"]
