"""Snapshot archives: a manifest with every member's sha256; extraction refuses anything unsafe or altered."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from sync.errors import IntegrityError
from sync.snapshot import MANIFEST, extract, file_digest, pack
from tests.sync.helpers import tree, write_checkpoint


def test_pack_then_extract_gives_back_the_same_files_and_manifest(tmp_path):
    run = tmp_path / "run"
    files = write_checkpoint(run, 200)
    archive = tmp_path / "snap.tar.gz"
    manifest = pack(run, files, {"step": 200, "val_accuracy": 0.5}, archive)
    out = extract(archive, tmp_path / "out", expected_sha256=file_digest(archive))
    assert out == manifest and out["step"] == 200
    assert tree(tmp_path / "out") == {f: (run / f).read_bytes() for f in files}
    assert set(manifest["files"]) == set(files)
    assert manifest["files"]["labels.json"]["sha256"] == file_digest(run / "labels.json")


def test_packing_the_same_files_twice_gives_identical_archives(tmp_path):
    run = tmp_path / "run"
    files = write_checkpoint(run, 5)
    pack(run, files, {"step": 5, "created": 1.0}, tmp_path / "a.tar.gz")
    pack(run, files, {"step": 5, "created": 1.0}, tmp_path / "b.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()


def test_archive_with_wrong_sha256_is_refused_and_nothing_is_extracted(tmp_path):
    run = tmp_path / "run"
    archive = tmp_path / "snap.tar.gz"
    pack(run, write_checkpoint(run, 1), {"step": 1}, archive)
    with pytest.raises(IntegrityError, match="sha256"):
        extract(archive, tmp_path / "out", expected_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def _evil_archive(path: Path, add) -> Path:
    """A gzip tar whose first member is a plausible manifest, then whatever add() puts in."""
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return path


def _add_file(tar, name, data=b"x"):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def _manifest(files):
    import hashlib
    return json.dumps({"step": 1, "files": {n: {"sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}
                                            for n in files}}).encode()


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/evil.txt", "checkpoints/../../escape.txt",
                                  ".sync/staged/x"])
def test_member_path_escaping_the_run_dir_is_refused(tmp_path, name):
    archive = _evil_archive(tmp_path / "evil.tar.gz", lambda tar: (
        _add_file(tar, MANIFEST, _manifest([name])), _add_file(tar, name)))
    with pytest.raises(IntegrityError, match="unsafe path"):
        extract(archive, tmp_path / "deep" / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "deep" / "out").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_are_refused(tmp_path, kind):
    def add(tar):
        _add_file(tar, MANIFEST, _manifest(["link"]))
        ti = tarfile.TarInfo("link")
        ti.type, ti.linkname = kind, "/etc/passwd"
        tar.addfile(ti)
    archive = _evil_archive(tmp_path / "evil.tar.gz", add)
    with pytest.raises(IntegrityError, match="link, device"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_member_not_matching_its_manifest_sha256_is_refused(tmp_path):
    archive = _evil_archive(tmp_path / "evil.tar.gz", lambda tar: (
        _add_file(tar, MANIFEST, _manifest(["a.txt"])), _add_file(tar, "a.txt", b"y")))
    with pytest.raises(IntegrityError, match="a.txt"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_member_missing_from_manifest_is_refused(tmp_path):
    archive = _evil_archive(tmp_path / "evil.tar.gz", lambda tar: (
        _add_file(tar, MANIFEST, _manifest(["a.txt"])), _add_file(tar, "a.txt"), _add_file(tar, "extra.txt")))
    with pytest.raises(IntegrityError, match="differ from its manifest"):
        extract(archive, tmp_path / "out")


def test_truncated_archive_is_refused(tmp_path):
    run = tmp_path / "run"
    archive = tmp_path / "snap.tar.gz"
    pack(run, write_checkpoint(run, 1, size=100_000), {"step": 1}, archive)
    archive.write_bytes(archive.read_bytes()[:-5000])
    with pytest.raises(IntegrityError):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pack_refuses_paths_outside_the_run_dir(tmp_path):
    with pytest.raises(IntegrityError):
        pack(tmp_path, ["../x"], {"step": 1}, tmp_path / "a.tar.gz")
