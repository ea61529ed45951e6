"""Snapshots: pack files into a tar.gz with a sha256 manifest; verify and safely extract one."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from common.files import file_digest, write_atomic
from sync.errors import IntegrityError
from common.files import replace_atomic

MANIFEST = "sync-manifest.json"
FORMAT = 1


def check_relpath(relpath: str) -> str:
    """Return relpath as a normalised POSIX path, or raise IntegrityError if it could escape its folder."""
    p = PurePosixPath(relpath)
    if (not relpath or p.is_absolute() or "\\" in relpath or ".." in p.parts or relpath.startswith("/")
            or str(p) in (".", "") or p.parts[0] in (".sync",)):
        raise IntegrityError(f"unsafe path {relpath!r} in snapshot: refused (absolute, '..', or .sync/).")
    return str(p)


def content_digest(members: dict[str, str]) -> str:
    """One sha256 over a snapshot's members ({relative path: sha256}): equal files, equal digest, whatever the
    archive's name or packing."""
    lines = "".join(f"{rel}\t{sha}\n" for rel, sha in sorted(members.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def local_content(root: Path, files) -> str:
    """The content digest of root/<files> as they are now on this machine."""
    return content_digest({check_relpath(rel): file_digest(root / rel) for rel in files})


def manifest_content(manifest: dict) -> str:
    """The content digest of a packed snapshot, from its manifest."""
    return content_digest({rel: meta["sha256"] for rel, meta in manifest["files"].items()})


def pack(root: Path, files: list[str], info: dict, dest: Path) -> dict:
    """Write root/<files> plus a manifest (info + sha256 of every member) to dest atomically; return the manifest."""
    members = {}
    for rel in sorted(set(check_relpath(f) for f in files)):
        path = root / rel
        members[rel] = {"sha256": file_digest(path), "size": path.stat().st_size}
    manifest = dict(info, format=FORMAT, files=members)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def write(raw) -> None:
        with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            tar.addfile(_member(MANIFEST, len(data)), io.BytesIO(data))
            for rel, meta in members.items():
                with open(root / rel, "rb") as f:
                    tar.addfile(_member(rel, meta["size"]), f)
    write_atomic(dest, write)
    return manifest


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file tar header with fixed owner and time, so packing is reproducible."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uid, ti.gid = size, 0o644, 0, 0, 0
    return ti


def verify_archive(archive: Path, expected_sha256: str | None) -> None:
    """Raise IntegrityError unless the archive's sha256 is the expected one."""
    if expected_sha256 and file_digest(archive) != expected_sha256:
        raise IntegrityError(f"snapshot {archive.name}: sha256 does not match the recorded one (corrupt "
                             f"download or remote copy); it was not used.")


def extract(archive: Path, dest: Path, expected_sha256: str | None = None) -> dict:
    """Verify and safely extract a snapshot into the new folder dest (via a temp folder); return its manifest."""
    verify_archive(archive, expected_sha256)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            manifest = _manifest(tar, members, archive)
            tar.extractall(tmp, members=members, filter="data")
        for rel, meta in manifest["files"].items():
            if file_digest(tmp / rel) != meta["sha256"]:
                raise IntegrityError(f"snapshot {archive.name}: member {rel} does not match its manifest sha256.")
        (tmp / MANIFEST).unlink()
        replace_atomic(tmp, dest)
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as e:
        raise IntegrityError(f"snapshot {archive.name} is not a valid snapshot archive ({type(e).__name__}: "
                             f"{e}); it was not used.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _manifest(tar: tarfile.TarFile, members: list[tarfile.TarInfo], archive: Path) -> dict:
    """Check every member is a safe regular file listed in the manifest; return the manifest."""
    names = []
    for m in members:
        if not m.isfile():
            raise IntegrityError(f"snapshot {archive.name}: member {m.name!r} is a link, device or folder; "
                                 f"refused.")
        names.append(check_relpath(m.name) if m.name != MANIFEST else MANIFEST)
    if not names or names[0] != MANIFEST:
        raise IntegrityError(f"snapshot {archive.name} has no {MANIFEST} first; refused.")
    manifest = json.loads(tar.extractfile(members[0]).read())
    listed = {check_relpath(r) for r in manifest.get("files", {})}
    if len(names) != len(set(names)) or set(names[1:]) != listed:
        raise IntegrityError(f"snapshot {archive.name}: its members differ from its manifest; refused.")
    for rel in manifest.get("cache", {}):
        check_relpath(rel)
    return manifest
