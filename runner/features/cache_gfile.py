"""The bottleneck cache's files written and read through tf.io.gfile, so a cache may live on a local disk or
in a bucket (gs://): the same shard format and names as runner/features/cache.py, each file renamed into place whole."""
from __future__ import annotations

import json
import uuid

import numpy as np
import tensorflow as tf

from common.files import write_atomic
from runner.features.cache import KEY_BYTES, encode_shard, identity_hash, verified_undecodable

UNDECODABLE_FILE = "undecodable.json"


def is_url(path: str) -> bool:
    """Whether `path` names a remote file system (gs://, s3://, ...) rather than a local path."""
    return "://" in str(path)


def join(folder: str, name: str) -> str:
    """`folder`/`name` for a local path or a URL."""
    return f"{str(folder).rstrip('/')}/{name}"


def put_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` whole: locally through a fsynced temp file and rename; remotely through a
    `.NAME.<random>.tmp` object renamed into place (a GCS object exists only once its upload is complete)."""
    if not is_url(path):
        write_atomic(path, lambda f: f.write(data))
        return
    folder, _, name = path.rpartition("/")
    tmp = join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def shard_dir(cache_root: str, identity: dict) -> str:
    """Where the shards of one backbone identity live (CACHE_DIR/<identity hash>)."""
    return join(cache_root, identity_hash(identity))


def ensure_identity(cache_root: str, identity: dict, dim: int) -> str:
    """Create the identity's folder and identity.json as BottleneckCache does, if missing; return the folder."""
    folder = shard_dir(cache_root, identity)
    tf.io.gfile.makedirs(folder)
    if not tf.io.gfile.exists(join(folder, "identity.json")):
        text = json.dumps(dict(identity, dim=dim), indent=1, sort_keys=True)
        put_atomic(join(folder, "identity.json"), text.encode())
    return folder


def write_shard(folder: str, keys: list[str], vectors: np.ndarray, dtype: str) -> str:
    """Write one content-named shard, keys first and vectors last (a shard counts once its .npy exists);
    writing the same content twice (a retried bundle) rewrites identical files. Returns the shard's stem."""
    name, key_bytes, vector_bytes = encode_shard(keys, vectors, dtype)
    put_atomic(join(folder, f"{name}.keys"), key_bytes)
    put_atomic(join(folder, f"{name}.npy"), vector_bytes)
    return name


def cached_keys(folder: str) -> set[str]:
    """The content hashes of every complete shard in `folder` (those whose .npy is in place)."""
    keys: set[str] = set()
    for npy in tf.io.gfile.glob(join(folder, "shard-*.npy")):
        with tf.io.gfile.GFile(npy[: -len(".npy")] + ".keys", "rb") as f:
            keys.update(k.decode() for k in np.frombuffer(f.read(), dtype=f"S{KEY_BYTES}"))
    return keys


def read_undecodable(cache_root: str) -> dict[str, str]:
    """CACHE_DIR/undecodable.json (content hash → reason), {} when there is none yet."""
    path = join(cache_root, UNDECODABLE_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path, "rb") as f:
        try:
            return verified_undecodable(json.loads(f.read()))
        except ValueError:
            return {}


def merge_undecodable(cache_root: str, reasons: dict[str, str]) -> None:
    """Add images that could not be decoded to CACHE_DIR/undecodable.json (one writer: the pipeline's end)."""
    if reasons:
        merged = dict(read_undecodable(cache_root), **reasons)
        put_atomic(join(cache_root, UNDECODABLE_FILE), json.dumps(merged, indent=1).encode())
