"""The tf.distribute strategy picked by config, the thread budget, and splitting a host batch across replicas."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import tensorflow as tf

from runner.run.config import TrainConfig
from runner.errors import RunnerError

log = logging.getLogger("runner")


@dataclass(frozen=True)
class ThreadBudget:
    """TensorFlow's thread pools for this machine."""
    intra_op: int    # one op (a convolution, a matmul) split across threads
    inter_op: int    # independent ops side by side


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_budget(cores: int) -> ThreadBudget:
    """The pools for `cores`: intra-op over every core, two inter-op threads.

    The backbone is one chain of ops, so more inter-op threads only add runnable threads that compete with
    the decoders; one would risk an op waiting for another (tensorflow/tensorflow#29937). Decoding runs on
    tf.data's own pool, one decoder per core (runner/features/extract.py image_pipeline, autotuning off). Measured on 2 shared cores: a fixed split (half the cores decoding, half
    computing) and a private decode pool were both slower, and the CPU time per image was the same in every
    arrangement, so the cores are shared, not partitioned: when one stage waits, the other has the machine."""
    return ThreadBudget(intra_op=cores, inter_op=2)


def current_thread_budget() -> ThreadBudget:
    """The budget for the cores this process may use."""
    return thread_budget(available_cores())


def configure_tensorflow(config: TrainConfig) -> None:
    """Thread budget, deterministic ops and logical CPU devices (before TensorFlow initialises devices)."""
    budget = current_thread_budget()
    tf.config.threading.set_intra_op_parallelism_threads(budget.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(budget.inter_op)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * config.cpu_devices)
        except RuntimeError as e:
            raise RunnerError(f"train.cpu_devices = {config.cpu_devices} could not be applied: {e}") from None


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The default strategy, or MirroredStrategy over all GPUs (or logical CPUs when there are none)."""
    log_devices(config.strategy)
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices)


def log_devices(strategy: str) -> None:
    """Say which devices extraction and training run on; warn when TensorFlow sees no GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        log.warning("extraction and training run on the CPU: TensorFlow sees no GPU (on Colab: Runtime → "
                    "Change runtime type → GPU; expect extraction to be many times slower on a CPU)")
        return
    names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
    used = names if strategy == "mirrored" else names[:1]
    log.info("extraction and training run on %s (%s strategy; %d GPU(s) visible)", ", ".join(used), strategy,
             len(gpus))


CPU_BATCH, GPU_BATCH = 32, 128  # cache.batch_size = 0: a ViT-B at 224 px in reduced precision fits 128 on a T4


def extraction_batch_size(configured: int) -> int:
    """cache.batch_size, or with 0 the batch for the device: GPU_BATCH with a GPU, CPU_BATCH without."""
    if configured:
        return configured
    return GPU_BATCH if tf.config.list_physical_devices("GPU") else CPU_BATCH


def distribute_batch(strategy: tf.distribute.Strategy, *arrays):
    """Split host arrays (first axis) into one contiguous slice per replica."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return tuple(tf.constant(a) for a in arrays)

    def slice_for(context):
        n = len(arrays[0])
        i = context.replica_id_in_sync_group
        lo, hi = n * i // replicas, n * (i + 1) // replicas
        return tuple(tf.constant(a[lo:hi]) for a in arrays)
    return strategy.experimental_distribute_values_from_function(slice_for)
