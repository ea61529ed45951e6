"""The scan's stat cache: an unchanged file is never opened again, here or after a restore on a fresh disk."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from runner.data.scan import HashIndex, scan_dataset

OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        OPENED.append(os.fspath(args[0]))


sys.addaudithook(_audit)  # every open() of a file by path raises the "open" audit event


def opened_below(folder: Path, action) -> list[str]:
    """The files below `folder` that `action()` opened."""
    OPENED.clear()
    action()
    return [p for p in OPENED if Path(p).resolve().is_relative_to(folder.resolve())]


def write_tree(root: Path, classes: int = 3, per_class: int = 8, age_s: float = 60) -> Path:
    """Tiny distinct JPEGs in class folders, their mtimes `age_s` in the past (as a dataset on disk is)."""
    past = time.time() - age_s
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (k * 80, i * 30, 7)).save(buffer, "JPEG")
            path = root / f"c{k}" / f"{i}.jpg"
            path.write_bytes(buffer.getvalue())
            os.utime(path, (past, past))
    return root


def scan(data: Path, index_path: Path):
    return scan_dataset(data, 10, 10, HashIndex(index_path), 1, "lines")


def test_a_second_scan_of_an_unchanged_tree_opens_no_image(tmp_path):
    data = write_tree(tmp_path / "data")
    first = opened_below(data, lambda: scan(data, tmp_path / "cache" / "file-hashes.json"))
    assert len(first) == 24, "the first scan reads every image once"
    result = {}
    second = opened_below(data, lambda: result.update(d=scan(data, tmp_path / "cache" / "file-hashes.json")))
    assert second == []
    assert len(result["d"].images) == 24


def test_a_changed_file_is_read_again_and_gets_its_new_hash(tmp_path):
    data = write_tree(tmp_path / "data")
    index = tmp_path / "cache" / "file-hashes.json"
    before = {r.relpath: r.sha256 for r in scan(data, index).images}
    changed = data / "c1" / "3.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 1, 1)).save(buffer, "JPEG")
    changed.write_bytes(buffer.getvalue())
    stamp = time.time() - 30
    os.utime(changed, (stamp, stamp))
    reopened = opened_below(data, lambda: before.update(after=scan(data, index)))
    assert reopened == [str(changed)]
    after = {r.relpath: r.sha256 for r in before.pop("after").images}
    assert after["c1/3.jpg"] != before["c1/3.jpg"]
    assert {k: v for k, v in after.items() if k != "c1/3.jpg"} == {k: v for k, v in before.items() if k != "c1/3.jpg"}


def test_a_file_written_just_before_the_scan_is_not_trusted_by_its_mtime(tmp_path):
    data = write_tree(tmp_path / "data", age_s=0)  # mtimes within the racy window
    index = tmp_path / "cache" / "file-hashes.json"
    scan(data, index)
    assert len(opened_below(data, lambda: scan(data, index))) == 24


def test_the_shipped_copy_lets_a_fresh_disk_skip_hashing(tmp_path):
    """A new VM: the data re-extracted elsewhere with the same names, sizes and mtimes (tar keeps them), the
    cache restored by sync with the content-named index copy only."""
    data = write_tree(tmp_path / "vm1" / "data")
    index = HashIndex(tmp_path / "vm1" / "cache" / "file-hashes.json")
    scan_dataset(data, 10, 10, index, 1, "lines")
    shipped = tmp_path / "vm1" / "cache" / index.shipped_name
    assert shipped.is_file() and index.shipped_name.startswith("file-hashes-")
    assert sorted(p.name for p in shipped.parent.iterdir()) == sorted(["file-hashes.json", index.shipped_name])
    fresh_data = tmp_path / "vm2" / "somewhere" / "data"
    shutil.copytree(data, fresh_data, copy_function=shutil.copy2)  # new inodes, same mtimes
    fresh_cache = tmp_path / "vm2" / "cache"
    fresh_cache.mkdir(parents=True)
    shutil.copy(shipped, fresh_cache / shipped.name)  # what sync's restore puts into cache_dir
    opened = opened_below(fresh_data, lambda: scan(fresh_data, fresh_cache / "file-hashes.json"))
    assert opened == []


def test_the_shipped_copy_is_immutable_and_replaced_when_the_index_changes(tmp_path):
    data = write_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    first = HashIndex(cache / "file-hashes.json")
    scan_dataset(data, 10, 10, first, 1, "lines")
    content = (cache / first.shipped_name).read_bytes()
    again = HashIndex(cache / "file-hashes.json")
    scan_dataset(data, 10, 10, again, 1, "lines")
    assert again.shipped_name == first.shipped_name and (cache / first.shipped_name).read_bytes() == content
    (data / "c0" / "0.jpg").unlink()
    changed = HashIndex(cache / "file-hashes.json")
    scan_dataset(data, 10, 10, changed, 1, "lines")
    assert changed.shipped_name != first.shipped_name and not (cache / first.shipped_name).exists()
    assert "c0/0.jpg" not in json.loads((cache / changed.shipped_name).read_text())["entries"]


def test_an_index_of_the_old_format_is_ignored_not_misread(tmp_path):
    data = write_tree(tmp_path / "data")
    index = tmp_path / "cache" / "file-hashes.json"
    index.parent.mkdir()
    index.write_text(json.dumps({str(data / "c0" / "0.jpg"): [1, 2, "0" * 64]}))
    assert all(r.sha256 != "0" * 64 for r in scan(data, index).images)


@pytest.mark.slow
def test_a_run_hands_the_index_copy_to_sync_with_the_cache(shared_assets, tmp_path):
    from tests.helpers import local_mobilenet_args, run_resume
    data = write_tree(tmp_path / "data", classes=2, per_class=12)
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, "train.steps=20", "eval.every_steps=10",
                                              "data.min_images_per_class=2", "backbone.image_size=128",
                                              data_dir=data))
    assert result.returncode == 0, result.stdout
    from sync import HAND_OVER_RECORD, STATE_DIR
    from sync.handover import load_record
    handed = load_record(run_dir / STATE_DIR / HAND_OVER_RECORD).cache_files
    copies = [name for name in handed if name.startswith("file-hashes-")]
    assert len(copies) == 1 and (cache_dir / copies[0]).is_file()


def test_the_scan_lists_images_in_sorted_path_order_with_subfolders_and_skips_hidden_files(tmp_path):
    data = write_tree(tmp_path / "data", classes=2, per_class=3)
    (data / "c0" / "sub" / "deeper").mkdir(parents=True)
    for name in ("c0/sub/b.JPG", "c0/sub/deeper/a.jpeg", "c0/Z.jpg", "c0/.hidden.jpg", "c0/notes.txt"):
        shutil.copy(data / "c0" / "0.jpg", data / name)
    expected = sorted(p for p in (data / "c0").rglob("*") if p.is_file() and not p.name.startswith(".")
                      and p.suffix.lower() in {".jpg", ".jpeg"})
    listed = [r.path for r in scan(data, tmp_path / "cache" / "file-hashes.json").images if r.label == 0]
    assert listed == [str(p) for p in expected]
    assert "c0/sub/deeper/a.jpeg" in {r.relpath for r in scan(data, tmp_path / "cache" / "file-hashes.json").images}


class StopAfter:
    """A StopFlag stand-in that turns true after `checks` checks (a signal arriving mid-scan, exactly there)."""
    signal_name = "SIGTERM"

    def __init__(self, checks: int):
        self.left = checks

    def __bool__(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_signal_during_the_scan_keeps_exactly_the_hashes_read_and_the_next_scan_reads_only_the_rest(tmp_path):
    from runner.errors import StopRequested
    data, index = write_tree(tmp_path / "data"), tmp_path / "cache" / "file-hashes.json"
    with pytest.raises(StopRequested, match="stopped by SIGTERM during the image scan"):
        scan_dataset(data, 10, 10, HashIndex(index), 1, "lines", StopAfter(10))
    assert len(json.loads(index.read_text())["entries"]) == 10
    rest = opened_below(data, lambda: scan(data, index))
    assert len(rest) == 24 - 10
