"""The thread budget: set from the cores this process may use, applied before TensorFlow starts."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO, child_env


def test_the_budget_follows_the_core_count():
    from runner.features.distribute import thread_budget
    for cores in (1, 2, 16):
        budget = thread_budget(cores)
        assert (budget.intra_op, budget.inter_op) == (cores, 2)


def test_configure_tensorflow_applies_the_budget_before_the_runtime_starts():
    script = ("from runner.run.config import TrainConfig\n"
              "from runner.features.distribute import configure_tensorflow, available_cores\n"
              "configure_tensorflow(TrainConfig())\n"
              "import tensorflow as tf\n"
              "print(available_cores(), tf.config.threading.get_intra_op_parallelism_threads(),\n"
              "      tf.config.threading.get_inter_op_parallelism_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    cores = len(os.sched_getaffinity(0))
    assert out == [str(cores), str(cores), "2"]


def test_the_extraction_pipeline_decodes_on_every_core_with_tf_data_autotuning_off(tmp_path):
    """Autotuning made the extraction rate swing 2x between repeats and, at times, the end of the input wait
    for the autotuner's next round (9-17 s at 0 % CPU): the pipeline runs with fixed settings instead."""
    import numpy as np
    from PIL import Image

    from runner.features.extract import image_pipeline
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(paths[-1])
    dataset = image_pipeline(paths, 32, 2)
    assert dataset.options().autotune.enabled is False
    graph = dataset._as_serialized_graph().numpy()
    assert b"ParallelMapDatasetV2" in graph and b"PrefetchDataset" in graph
    batches = list(dataset)
    assert [len(positions) for _, positions in batches] == [2, 2, 1]
    assert [int(p) for _, positions in batches for p in positions] == [0, 1, 2, 3, 4]
