"""The head's inputs grow linearly with the cached vectors: the validation split is read and standardized
without temporaries the size of the split (tracemalloc sees numpy's allocations, in-process)."""
from __future__ import annotations

import tracemalloc

import numpy as np

from runner.features.cache import BottleneckCache
from runner.run.config import Config
from runner.training.head import build_head
from runner.training.search import build_search, candidate_grid, head_budget

ROWS, DIM = 6000, 256


def cached_table(root, rows: int = ROWS):
    cache = BottleneckCache(root, {"test": True}, DIM)
    keys = [f"{i:064x}" for i in range(rows)]
    rng = np.random.default_rng(0)
    for lo in range(0, rows, 1000):
        cache.add_shard(keys[lo:lo + 1000], rng.normal(0, 1, (min(1000, rows - lo), DIM)))
    return BottleneckCache(root, {"test": True}, DIM).table(keys)


def peak_bytes(work) -> tuple[int, object]:
    """(peak bytes numpy allocated while running work(), what it returned, still held)."""
    tracemalloc.start()
    try:
        result = work()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_reading_a_split_whole_peaks_at_the_array_itself(tmp_path):
    table = cached_table(tmp_path)
    float32_bytes = ROWS * DIM * 4
    peak, features = peak_bytes(lambda: table.all(batch=500))
    assert features.shape == (ROWS, DIM) and features.dtype == np.float32
    np.testing.assert_array_equal(features[1234], table.gather(np.array([1234]))[0])
    assert peak < 1.2 * float32_bytes, f"all() peaked at {peak / float32_bytes:.2f}x its result"


def test_the_search_inputs_of_the_validation_split_peak_below_twice_its_size(tmp_path):
    table = cached_table(tmp_path)
    config = Config()
    head = build_head(5, DIM, config.head, 0)
    mean, std = np.full(DIM, 0.5, np.float32), np.full(DIM, 2.0, np.float32)
    head.set_standardization(mean, std)
    search = build_search(candidate_grid(ROWS)[:2], head, config, head_budget(config.train, ROWS), 5)
    float32_bytes = ROWS * DIM * 4
    peak, inputs = peak_bytes(lambda: search.standardize(table.all(batch=500)))
    assert inputs.dtype == np.float32
    np.testing.assert_allclose(inputs, (table.all() - mean) / std, rtol=1e-6)
    assert peak < 2.2 * float32_bytes, f"reading and standardizing peaked at {peak / float32_bytes:.2f}x the split"
