"""The scan of data.dir with its stat cache: first scan, second scan of the unchanged tree, and the scan on
a fresh disk that has only the file-hash index restored by sync.

    python bench/scan.py [--classes 1000] [--per-class 100]

The tree is generated: distinct tiny JPEGs (a few hundred bytes each), so the figures are the cost of
walking, stat-ing and hashing files, not of big reads. Files opened during each scan are counted with an
audit hook.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.data.scan import HashIndex, scan_dataset  # noqa: E402

OPENED = [0]
WATCHED: list[str] = []  # count only opens below these folders (the data tree)


def _count_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str) and any(args[0].startswith(w) for w in WATCHED):
        OPENED[0] += 1


def tiny_jpeg() -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tree(root: Path, classes: int, per_class: int) -> list[str]:
    """classes x per_class distinct valid JPEGs (a unique comment segment each), dated an hour ago."""
    base, past = tiny_jpeg(), time.time() - 3600
    for k in range(classes):
        folder = root / f"class_{k:04d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            comment = f"{k}/{i}".encode()
            path = folder / f"img_{i:04d}.jpg"
            path.write_bytes(base[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + base[2:])
            os.utime(path, (past, past))
    return [f"class_{k:04d}" for k in range(classes)]


def timed_scan(data: Path, index_path: Path):
    """(seconds, files opened, dataset, index) of one scan."""
    OPENED[0] = 0
    start = time.perf_counter()
    index = HashIndex(index_path)
    dataset = scan_dataset(data, 10, 10, index, 1, "lines")
    return time.perf_counter() - start, OPENED[0], dataset, index


def measure_scans(data: Path, work: Path) -> dict:
    """First scan, second scan, and a fresh disk's scan with only the shipped index copy."""
    WATCHED[:] = [str(data), str(data.resolve())]
    sys.addaudithook(_count_opens)
    first = timed_scan(data, work / "cache" / "file-hashes.json")
    second = timed_scan(data, work / "cache" / "file-hashes.json")
    fresh_cache = work / "fresh-cache"
    fresh_cache.mkdir()
    shutil.copy(work / "cache" / second[3].shipped_name, fresh_cache / second[3].shipped_name)
    fresh = timed_scan(data, fresh_cache / "file-hashes.json")
    return {"files": len(first[2].images), "index_bytes": (work / "cache" / "file-hashes.json").stat().st_size,
            "first": first[:2], "second": second[:2], "fresh_disk": fresh[:2], "dataset": second[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_tree(Path(tmp) / "data", args.classes, args.per_class)
        print(f"generated {args.classes * args.per_class} files in {time.perf_counter() - start:.1f} s")
        result = measure_scans(Path(tmp) / "data", Path(tmp))
    print(f"\nscan of {result['files']} files (index {result['index_bytes'] / 2 ** 20:.1f} MiB), {os.cpu_count()} CPUs")
    for name in ("first", "second", "fresh_disk"):
        seconds, opened = result[name]
        print(f"  {name:10s} {seconds:6.2f} s, {opened} image files opened")


if __name__ == "__main__":
    main()
