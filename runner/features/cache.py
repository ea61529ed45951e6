"""The bottleneck cache: content-keyed vectors in atomically written, memory-mapped shards.

Layout: CACHE_DIR/<identity hash>/identity.json; per shard `shard-<id>.keys` (the image content hashes,
64 ASCII bytes each) and `shard-<id>.npy` (the vectors, N x dim), the .npy renamed into place last so a
shard counts only when complete (a kill loses at most the shard being filled); <id> is the start of the
sha256 of both files' bytes, checked once each time the cache is opened (a shard that fails is set aside
as .corrupt and its images are extracted again); and
CACHE_DIR/undecodable.json (content hash → reason) for images whose bytes do not decode (never for an image
that could not be read: that one is left out of the current run only, cache.unreadable). Keys and
vectors live in separate files so opening the cache never pages the vectors in.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from common.files import replace_atomic, write_atomic, write_text_atomic

log = logging.getLogger("runner")

KEY_BYTES = 64  # hex sha256 of the image bytes
# the reason written before a read failure and a decode failure were told apart: such an entry may be a good
# photo that could not be read for a moment, so it is not trusted; the image is diagnosed again
UNVERIFIED_REASON = "undecodable: TensorFlow could not decode the image (corrupt or unsupported variant)"


def verified_undecodable(entries: dict[str, str]) -> dict[str, str]:
    """The entries of an undecodable.json that were diagnosed from the image's bytes."""
    return {sha: reason for sha, reason in entries.items() if reason != UNVERIFIED_REASON}


def identity_hash(identity: dict) -> str:
    """The folder name for vectors made by one backbone identity (name, weights hash, size, alpha)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(key_bytes: bytes, vector_bytes: bytes) -> str:
    """A shard's file stem: named by the content of its keys and vectors files."""
    return "shard-" + hashlib.sha256(key_bytes + vector_bytes).hexdigest()[:24]


def encode_shard(keys: list[str], vectors: np.ndarray, dtype) -> tuple[str, bytes, bytes]:
    """A shard's (file stem, .keys bytes, .npy bytes) for these keys and vectors stored as `dtype`."""
    key_bytes = np.array([k.encode() for k in keys], dtype=f"S{KEY_BYTES}").tobytes()
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vectors, dtype=dtype))
    vector_bytes = buffer.getvalue()
    return shard_name(key_bytes, vector_bytes), key_bytes, vector_bytes


def check_content_hash(vectors_path: Path) -> None:
    """Raise ValueError when a shard's bytes no longer match the hash in its name (bit rot, bad copy)."""
    digest = hashlib.sha256(vectors_path.with_suffix(".keys").read_bytes())
    with open(vectors_path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if "shard-" + digest.hexdigest()[:24] != vectors_path.stem:
        raise ValueError("its bytes do not match the content hash in its name")


class BottleneckCache:
    """Vectors for one backbone identity, keyed by image content hash, read memory-mapped."""

    def __init__(self, cache_dir: Path, identity: dict, dim: int, dtype: str = "float16"):
        self.root = Path(cache_dir)
        self.dir = self.root / identity_hash(identity)
        self.dir.mkdir(parents=True, exist_ok=True)
        identity_file = self.dir / "identity.json"
        if not identity_file.exists():
            write_text_atomic(identity_file, json.dumps(dict(identity, dim=dim), indent=1, sort_keys=True))
        self.dim, self.dtype = dim, np.dtype(dtype)
        self.shards: list[np.ndarray] = []
        self.shard_names: list[str] = []
        self.index: dict[bytes, tuple[int, int]] = {}
        self.undecodable: dict[str, str] = self._read_undecodable()
        self.unreadable: dict[str, str] = {}  # images left out of this run only (never saved)
        for path in sorted(self.dir.glob("shard-*.npy")):
            self._open_shard(path, verify=True)

    def _read_undecodable(self) -> dict[str, str]:
        try:
            entries = json.loads((self.root / "undecodable.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return verified_undecodable(entries)

    def _open_shard(self, path: Path, verify: bool) -> None:
        keys_path = path.with_suffix(".keys")
        try:
            if verify:
                check_content_hash(path)
            vectors = np.load(path, mmap_mode="r")
            keys = np.fromfile(keys_path, dtype=f"S{KEY_BYTES}")
            if vectors.shape != (len(keys), self.dim):
                raise ValueError(f"{len(keys)} keys but vectors of shape {vectors.shape}")
        except (ValueError, OSError) as e:
            log.warning("cache shard %s is unreadable (%s); its images will be extracted again", path, e)
            replace_atomic(path, path.with_suffix(".corrupt"))
            return
        number = len(self.shards)
        self.shards.append(vectors)
        self.shard_names.append(path.stem)
        for row, key in enumerate(keys):
            self.index[bytes(key)] = (number, row)

    def __len__(self) -> int:
        return len(self.index)

    def has(self, sha256: str) -> bool:
        return sha256.encode() in self.index

    def add_shard(self, keys: list[str], vectors: np.ndarray) -> Path:
        """Write one complete shard atomically (keys first, vectors last) and make it readable."""
        name, key_bytes, vector_bytes = encode_shard(keys, vectors, self.dtype)
        write_atomic(self.dir / f"{name}.keys", lambda f: f.write(key_bytes))
        write_atomic(self.dir / f"{name}.npy", lambda f: f.write(vector_bytes))
        self._open_shard(self.dir / f"{name}.npy", verify=False)  # its bytes were hashed just above
        return self.dir / f"{name}.npy"

    def mark_undecodable(self, reasons: dict[str, str]) -> None:
        """Remember images whose bytes do not decode so they are skipped, not retried, next time."""
        if reasons:
            self.undecodable.update(reasons)
            for sha in reasons:
                self.unreadable.pop(sha, None)
            write_text_atomic(self.root / "undecodable.json", json.dumps(self.undecodable, indent=1))

    def mark_unreadable(self, reasons: dict[str, str]) -> None:
        """Leave out of this run images that could not be read (or changed since the scan); not saved, so
        the next run reads them again."""
        self.unreadable.update(reasons)

    def left_out(self) -> dict[str, str]:
        """Hash → reason of every image this run cannot use: undecodable for good, or unreadable now."""
        return {**self.unreadable, **self.undecodable}

    def files(self) -> list[str]:
        """Cache files relative to the cache root (immutable shards and the identity), for sync."""
        names = ["identity.json"] + [f"{stem}{ext}" for stem in self.shard_names for ext in (".keys", ".npy")]
        return [f"{self.dir.name}/{n}" for n in names]

    def table(self, keys: list[str]) -> "FeatureTable":
        """The vectors of `keys`, in that order, as a gatherable table."""
        located = np.array([self.index[k.encode()] for k in keys], dtype=np.int64).reshape(-1, 2)
        return FeatureTable(self.shards, located[:, 0], located[:, 1], self.dim)


class FeatureTable:
    """Rows of a dataset split, read on demand from memory-mapped shards (no full copy in RAM)."""

    def __init__(self, shards: list[np.ndarray], shard_ids: np.ndarray, rows: np.ndarray, dim: int):
        self.shards, self.shard_ids, self.rows, self.dim = shards, shard_ids, rows, dim

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """float32 vectors for the given row indices of this table."""
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        shard_ids, rows = self.shard_ids[indices], self.rows[indices]
        for shard in np.unique(shard_ids):
            mask = shard_ids == shard
            out[mask] = self.shards[shard][rows[mask]]
        return out

    def all(self, batch: int = 8192) -> np.ndarray:
        """Every vector as one float32 array (use for the small validation/test splits), filled in place
        batch by batch: the peak is the array itself, not its parts plus their concatenation."""
        out = np.empty((len(self), self.dim), np.float32)
        for lo in range(0, len(self), batch):
            out[lo:lo + batch] = self.gather(np.arange(lo, min(lo + batch, len(self))))
        return out
