"""Extraction tells a photo whose bytes do not decode (recorded as undecodable, for good) from one that could
not be read for a moment (left out of this run only, read again next time): a class folder renamed while it
is extracted, or a mount that fails a read, never poisons good photos in cache/undecodable.json."""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import CLOTHING, MOBILENET_WEIGHTS


@pytest.fixture(scope="module")
def backbone(shared_assets):
    from runner.features.backbones import build_backbone
    from runner.run.config import BackboneConfig
    return build_backbone(BackboneConfig(name="mobilenet", weights=str(MOBILENET_WEIGHTS), alpha=0.25))


@pytest.fixture
def photos(tmp_path, shared_assets) -> list[Path]:
    """Four real photos in a class folder `hat/`, and one file whose bytes are not an image."""
    folder = tmp_path / "data" / "hat"
    folder.mkdir(parents=True)
    paths = []
    for i, source in enumerate(sorted((CLOTHING / "hat").glob("*.jpg"))[:4]):
        paths.append(folder / f"photo_{i}.jpg")
        shutil.copyfile(source, paths[-1])
    paths.append(folder / "garbage.jpg")
    paths[-1].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9")
    return paths


def records_of(paths: list[Path]):
    from runner.data.scan import ImageRecord
    return [ImageRecord(str(p), f"hat/{p.name}", 0, "train", hashlib.sha256(p.read_bytes()).hexdigest())
            for p in paths]


def extract(records, backbone, cache_dir: Path):
    import tensorflow as tf
    from runner.features.cache import BottleneckCache
    from runner.features.extract import extract_missing
    cache = BottleneckCache(cache_dir, backbone.cache_identity, backbone.feature_dim)
    return cache, extract_missing(records, backbone, cache, tf.distribute.get_strategy(), 2, 100, "lines")


def saved_undecodable(cache_dir: Path) -> dict:
    path = cache_dir / "undecodable.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def test_a_class_folder_renamed_during_extraction_is_skipped_for_this_run_only(backbone, photos, tmp_path,
                                                                               monkeypatch):
    from runner.features import extract as extract_module
    monkeypatch.setattr(extract_module, "READ_WAIT_S", 0.0)
    records = records_of(photos)
    garbage = records[-1].sha256
    photos[0].parent.rename(tmp_path / "data" / "hats")  # renamed between the scan and the extraction
    cache, computed = extract(records, backbone, tmp_path / "cache")
    assert computed == 0
    assert saved_undecodable(tmp_path / "cache") == {}, "a photo that could not be read is not 'corrupt'"
    assert set(cache.unreadable) == {r.sha256 for r in records}
    assert all("gone since the scan" in reason for reason in cache.unreadable.values())
    # the next run scans the new name: the same bytes are extracted; only the garbage is undecodable
    renamed = records_of(sorted((tmp_path / "data" / "hats").glob("*.jpg")))
    cache, computed = extract(renamed, backbone, tmp_path / "cache")
    assert computed == len(renamed) - 1
    assert set(saved_undecodable(tmp_path / "cache")) == {garbage}
    assert "do not decode" in saved_undecodable(tmp_path / "cache")[garbage]
    assert cache.unreadable == {}


def test_a_read_that_fails_for_a_moment_is_retried_and_the_photo_extracted(backbone, photos, tmp_path,
                                                                          monkeypatch):
    """The pipeline cannot read one photo (it is away); the first re-read fails with EIO, as a network mount
    does, and the photo is back for the next: it is extracted in this run, and nothing is marked."""
    from runner.features import extract as extract_module
    monkeypatch.setattr(extract_module, "READ_WAIT_S", 0.0)
    records = records_of(photos[:-1])
    away = photos[1].with_name("away")
    photos[1].rename(away)
    real_read, reads = extract_module.read_image, []

    def flaky_read(path: str) -> bytes:
        reads.append(path)
        if path == str(photos[1]) and away.exists():
            away.rename(photos[1])
            raise OSError(errno.EIO, "Input/output error")
        return real_read(path)

    monkeypatch.setattr(extract_module, "read_image", flaky_read)
    cache, computed = extract(records, backbone, tmp_path / "cache")
    assert reads.count(str(photos[1])) >= 2, "the failed read was tried again"
    assert computed == len(records)
    assert all(cache.has(r.sha256) for r in records)
    assert cache.unreadable == {} and saved_undecodable(tmp_path / "cache") == {}


def test_a_read_that_keeps_failing_leaves_the_photo_out_of_this_run_with_the_reason(backbone, photos, tmp_path,
                                                                                  monkeypatch):
    from runner.features import extract as extract_module
    monkeypatch.setattr(extract_module, "READ_WAIT_S", 0.0)
    records = records_of(photos[:-1])
    photos[2].rename(photos[2].with_name("away"))

    def failing_read(path: str) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(extract_module, "read_image", failing_read)
    cache, computed = extract(records, backbone, tmp_path / "cache")
    assert computed == len(records) - 1
    assert list(cache.unreadable) == [records[2].sha256]
    reason = cache.unreadable[records[2].sha256]
    assert "Input/output error" in reason and f"{extract_module.READ_TRIES} tries" in reason
    assert saved_undecodable(tmp_path / "cache") == {}


def test_entries_written_before_reads_and_decodes_were_told_apart_are_diagnosed_again(backbone, photos, tmp_path,
                                                                                     monkeypatch):
    """A cache poisoned by the old extraction (good photos recorded as undecodable) heals by itself."""
    from runner.features.cache import UNVERIFIED_REASON
    records = records_of(photos)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "undecodable.json").write_text(
        json.dumps({r.sha256: UNVERIFIED_REASON for r in records}), encoding="utf-8")
    cache, computed = extract(records, backbone, tmp_path / "cache")
    assert computed == len(records) - 1
    assert set(saved_undecodable(tmp_path / "cache")) == {records[-1].sha256}


def test_a_read_failure_during_the_scan_skips_the_photo_for_this_run_without_blaming_permissions(tmp_path,
                                                                                               monkeypatch):
    from runner.data.scan import HashIndex, scan_dataset
    from tests.helpers import write_synthetic_dataset
    data = write_synthetic_dataset(tmp_path / "data", num_classes=2, per_class=4, size=24)
    flaky = data / "class_0000" / "img_001.jpg"
    real_read = Path.read_bytes

    def read_bytes(self):
        if self == flaky:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    dataset = scan_dataset(data, 0, 0, HashIndex(tmp_path / "hashes.json"), 1, "lines")
    (skipped,) = dataset.skipped
    assert skipped["path"] == "class_0000/img_001.jpg"
    assert "Input/output error" in skipped["reason"] and "permissions" not in skipped["reason"]
    assert "next start reads it again" in skipped["reason"]
    monkeypatch.undo()
    assert len(scan_dataset(data, 0, 0, HashIndex(tmp_path / "hashes.json"), 1, "lines").images) == 8
