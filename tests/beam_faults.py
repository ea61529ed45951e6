"""A DoFn for tests/test_beam.py that kills its worker once, mid-bundle, after a shard is half written."""
from __future__ import annotations

import os
from pathlib import Path

from runner.features import cache_gfile as cache_files
from runner.features.beam import ExtractShard
from runner.features.cache import encode_shard


class DieOnceMidShard(ExtractShard):
    """Writes the first shard's .keys and half its .npy as a temp file, then os._exit()s (once: a marker file
    beside the cache records that it died; later writes are the normal ones)."""

    def write(self, keys, vectors):
        marker = Path(self.folder).parent / "died-once"
        if marker.exists():
            return super().write(keys, vectors)
        marker.write_text(str(os.getpid()))
        name, key_bytes, vector_bytes = encode_shard(keys, vectors, self.dtype)
        cache_files.put_atomic(cache_files.join(self.folder, f"{name}.keys"), key_bytes)
        Path(self.folder, f".{name}.npy.killed.tmp").write_bytes(vector_bytes[: len(vector_bytes) // 2])
        os._exit(1)
