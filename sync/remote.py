"""The remote catalog: snapshot and cache names, the latest pointer, listing, and retention."""
from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sync.backends.base import Backend, RemoteFile
from sync.errors import IntegrityError, NotFound, SyncError
from common.files import write_text_atomic

log = logging.getLogger("sync")
POINTER = "latest.json"
CACHE_FOLDER = "cache"  # cache shards live in this subfolder, out of the way of the snapshots
_SNAPSHOT_NAME = re.compile(r"snapshot-(\d{9,})-.*\.tar\.gz")


def snapshot_name(step: int, run_id: str) -> str:
    """The remote file name of the snapshot of step (run ids are reduced to safe characters)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)[:40] or "run"
    return f"snapshot-{step:09d}-{safe}.tar.gz"


def cache_name(sha256: str) -> str:
    """The remote, content-addressed name of a cache shard."""
    return f"{CACHE_FOLDER}/cache-{sha256}"


def legacy_cache_name(sha256: str) -> str:
    """Where cache shards were stored before the cache/ subfolder (still read, never written)."""
    return f"cache-{sha256}"


def remote_cache(backend: Backend) -> set[str]:
    """The sha256 of every cache shard on the remote, in cache/ or (older remotes) at the top."""
    names = [f.name for f in backend.list(CACHE_FOLDER)] + [f.name for f in backend.list()]
    return {n.rpartition("cache-")[2] for n in names if n.rpartition("/")[2].startswith("cache-")}


@dataclass
class SnapshotInfo:
    """A snapshot on the remote: its name and step, and what its properties add (sha256, val accuracy)."""
    name: str
    step: int
    val_accuracy: float | None
    sha256: str
    size: int
    created: float
    file_id: str = ""
    run_id: str = ""
    final: bool = False  # the run's final snapshot (its results and export inside)
    content: str = ""    # sync.snapshot.content_digest of its members ("" for snapshots sent before it existed)

    @classmethod
    def from_remote(cls, f: RemoteFile) -> "SnapshotInfo | None":
        """A snapshot's description from its name and (optional) properties; None if f is no snapshot.

        The name alone is enough to list and restore it (the archive's own manifest is verified), so a machine
        that cannot read the properties still finds every snapshot."""
        m = _SNAPSHOT_NAME.fullmatch(f.name)
        if not m:
            return None
        p = f.properties
        try:
            acc = float(p["val_accuracy"]) if p.get("val_accuracy") not in (None, "", "None") else None
            created = float(p.get("created") or f.modified)
        except ValueError:
            log.warning("ignoring the unreadable properties of %s", f.name)
            acc, created = None, f.modified
        return cls(f.name, int(m.group(1)), acc, p.get("sha256", ""), f.size, created, f.id, p.get("run_id", ""),
                   p.get("final") == "1", p.get("content", ""))

    def properties(self) -> dict[str, str]:
        """The remote properties (Drive's public `properties`) that describe this snapshot."""
        return {"kind": "snapshot", "step": str(self.step), "sha256": self.sha256, "created": f"{self.created:.3f}",
                "val_accuracy": "" if self.val_accuracy is None else repr(float(self.val_accuracy)),
                "run_id": self.run_id, "final": "1" if self.final else "", "content": self.content}


def list_snapshots(backend: Backend) -> list[SnapshotInfo]:
    """Snapshots on the remote (by listing, trashed ones excluded), newest step first."""
    found = (SnapshotInfo.from_remote(f) for f in backend.list())
    return sorted((s for s in found if s is not None), key=lambda s: (s.step, s.created), reverse=True)


def snapshot_on_remote(backend: Backend, step: int, final: bool, content: str | None = None) -> bool:
    """Whether the remote holds the snapshot of step (with final: the run's final one of that step; with
    content: one whose members are exactly these, by their content digest)."""
    candidates = list_snapshots(backend)
    pointer = read_pointer(backend)
    if pointer is not None:
        candidates.append(pointer)  # verified and pointed to, but perhaps not in the (lagging) listing yet
    return any(s.step == step and (s.final or not final) and (content is None or s.content == content)
               for s in candidates)


def read_pointer(backend: Backend) -> SnapshotInfo | None:
    """The snapshot named by the remote latest pointer, or None if there is no readable pointer."""
    with tempfile.TemporaryDirectory(prefix="sync-pointer-") as tmp:
        dest = Path(tmp) / POINTER
        try:
            backend.get(POINTER, dest)
            data = json.loads(dest.read_text(encoding="utf-8"))
            return SnapshotInfo(data["name"], int(data["step"]), data.get("val_accuracy"), data["sha256"],
                                int(data["size"]), float(data["created"]), str(data.get("file_id", "")),
                                str(data.get("run_id", "")), bool(data.get("final", False)),
                                str(data.get("content", "")))
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError, IntegrityError):
            log.warning("the remote %s is unreadable; using the folder listing instead", POINTER)
            return None


def write_pointer(backend: Backend, snap: SnapshotInfo, work_dir: Path) -> None:
    """Point the remote latest.json at snap (called only after snap is verified)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    local = work_dir / POINTER
    write_text_atomic(local, json.dumps(snap.__dict__, sort_keys=True))
    backend.put(POINTER, local, {})
    local.unlink()


def check_owner(backend: Backend, run_id: str, pointer: SnapshotInfo | None) -> None:
    """Refuse a remote whose latest pointer belongs to another run (run ids are run dir names): two runs in one
    folder would move each other's pointer and prune each other's snapshots."""
    if pointer is not None and pointer.run_id and pointer.run_id != run_id:
        raise SyncError(f"{backend.description} already holds the snapshots of another run "
                        f"({pointer.run_id!r}, newest step {pointer.step}); this run is {run_id!r}. Two runs in "
                        f"one folder would overwrite each other's {POINTER} and prune each other's snapshots: "
                        f"give this run its own sync.folder, or, to continue that run here, name the run dir "
                        f"{pointer.run_id!r} as it was.")


def restore_candidates(backend: Backend, run_id: str | None = None) -> list[SnapshotInfo]:
    """Snapshots to try restoring, best first: by newest step, and within a step the pointer's target, then
    copies with a recorded sha256 (verifiable), then the newest. Every stored copy is a candidate, also copies
    that share a name (Drive allows that): a junk copy is skipped for the next one, never for the next name.
    With run_id, a remote whose pointer belongs to another run is refused."""
    pointer = read_pointer(backend)
    if run_id is not None:
        check_owner(backend, run_id, pointer)

    def pointed(s: SnapshotInfo) -> bool:  # a pointer without a file id names every copy of its name
        return pointer is not None and s.name == pointer.name and (not pointer.file_id or s.file_id == pointer.file_id)
    copies = {(s.name, s.file_id): s for s in list_snapshots(backend)}
    if pointer and not any(pointed(s) for s in copies.values()):
        copies[(pointer.name, pointer.file_id)] = pointer  # verified and pointed to, not in the (lagging) listing yet
    return sorted(copies.values(), key=lambda s: (s.step, pointed(s), bool(s.sha256), s.created), reverse=True)


def retention_victims(snapshots: list[SnapshotInfo], keep: int, verified_step: int) -> list[SnapshotInfo]:
    """Snapshots to delete: not among the newest `keep`, not the best by val accuracy, older than verified_step."""
    by_step = sorted(snapshots, key=lambda s: (s.step, s.created), reverse=True)
    kept = {s.name for s in by_step[:keep]}
    scored = [s for s in by_step if s.val_accuracy is not None]
    if scored:
        kept.add(max(scored, key=lambda s: (s.val_accuracy, s.step)).name)
    return [s for s in by_step if s.name not in kept and s.step < verified_step]


def prune(backend: Backend, keep: int, verified_step: int | None = None) -> list[SnapshotInfo]:
    """Delete the snapshots retention does not keep; return them."""
    snapshots = list_snapshots(backend)
    if verified_step is None:
        verified_step = snapshots[0].step if snapshots else 0
    victims = retention_victims(snapshots, keep, verified_step)
    for snap in victims:
        backend.delete(snap.name)
        log.info("deleted old snapshot %s (step %d)", snap.name, snap.step)
    return victims
