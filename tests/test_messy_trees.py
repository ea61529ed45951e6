"""Datasets as people have them: macOS litter, hidden files, link loops, non-UTF-8 names, WebP, HEIC.
Litter is passed over in silence; whatever cannot be used is listed with a reason; nothing crashes."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.data.scan import HashIndex, scan_dataset
from tests.helpers import write_synthetic_dataset
from tests.test_job import RecordingSync, _job, tiny_config

PER_CLASS = 12
NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # how Python names a Latin-1 file name on Linux (surrogate-escaped)
HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64


def webp_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "WEBP", **options)
    return out.getvalue()


def make_messy_tree(root: Path) -> Path:
    """Three classes of PER_CLASS usable images (the third all WebP: still, lossless and with alpha), plus
    the litter of a macOS zip, hidden files, link loops, a non-UTF-8 name, HEIC photos and an animated WebP."""
    write_synthetic_dataset(root, num_classes=3, per_class=PER_CLASS, size=40)
    webp_class = root / "class_0002"
    for i, jpeg in enumerate(sorted(webp_class.glob("*.jpg"))):
        image = Image.open(jpeg).convert("RGBA" if i % 3 == 2 else "RGB")
        (webp_class / f"{jpeg.stem}.webp").write_bytes(webp_bytes(image, lossless=i % 3 == 1))
        jpeg.unlink()
    frames = [Image.open(io.BytesIO(webp_bytes(Image.new("RGB", (40, 40), c)))) for c in ("red", "blue")]
    (webp_class / "animated.webp").write_bytes(webp_bytes(frames[0], save_all=True, append_images=frames[1:]))
    first = root / "class_0000"
    photo = (first / "img_000.jpg").read_bytes()
    for folder in (root / "__MACOSX", root / "__MACOSX" / "class_0000"):  # what Finder's "Compress" adds
        folder.mkdir(exist_ok=True)
    (root / "__MACOSX" / "class_0000" / "._img_000.jpg").write_bytes(APPLE_DOUBLE)
    (first / "._img_000.jpg").write_bytes(APPLE_DOUBLE)
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (first / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".hidden_class").mkdir()
    (first / ".thumbnails").mkdir()
    (first / ".thumbnails" / "t.jpg").write_bytes(photo)
    (first / "loop").symlink_to(first, target_is_directory=True)          # a link back to its own class
    (first / "deeper").mkdir()
    (first / "deeper" / "up").symlink_to("..", target_is_directory=True)   # a link to its parent
    (first / "self.jpg").symlink_to("self.jpg")                           # a link to itself (ELOOP)
    (first / "gone.jpg").symlink_to("nowhere.jpg")                        # a broken link
    second = root / "class_0001"
    (second / NON_UTF8).write_bytes(photo)
    (second / os.fsdecode(b"dossier-\xff")).mkdir()
    (second / "IMG_0001.HEIC").write_bytes(HEIC_HEAD)
    (second / "renamed.jpg").write_bytes(HEIC_HEAD)  # a HEIC photo renamed to .jpg
    return root


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory):
    return make_messy_tree(tmp_path_factory.mktemp("messy") / "data")


EXPECTED_REASONS = {  # skipped path → a phrase of its reason
    "class_0000/deeper/up/": "already scanned",
    "class_0000/loop/": "already scanned",
    "class_0000/self.jpg": "unreadable link",
    "class_0000/gone.jpg": "broken symbolic link",
    "class_0001/caf\\xe9.jpg": "not valid UTF-8",
    "class_0001/dossier-\\xff/": "not valid UTF-8",
    "class_0001/IMG_0001.HEIC": "convert it to JPEG",
    "class_0001/renamed.jpg": "convert it to JPEG",
    "class_0002/animated.webp": "animated WebP",
}


def test_a_messy_tree_scans_to_its_classes_listing_what_it_skipped(messy_tree, tmp_path, caplog):
    dataset = scan_dataset(messy_tree, 20, 20, HashIndex(tmp_path / "h.json"), 2, "lines")
    assert dataset.classes == ["class_0000", "class_0001", "class_0002"]
    counts = [sum(r.label == k for r in dataset.images) for k in range(3)]
    assert counts == [PER_CLASS] * 3
    reasons = {s["path"]: s["reason"] for s in dataset.skipped}
    assert set(reasons) == set(EXPECTED_REASONS), reasons  # litter (__MACOSX, ._*, .DS_Store, .hidden) unlisted
    for path, phrase in EXPECTED_REASONS.items():
        assert phrase in reasons[path], (path, reasons[path])
    json.dumps(dataset.skipped, ensure_ascii=False).encode("utf-8")  # no surrogate left to crash a record
    for record in caplog.records:
        record.getMessage().encode("utf-8")
    assert json.loads((tmp_path / "h.json").read_text())["format"]  # the hash index was saved


def test_a_run_on_a_messy_tree_decodes_webp_and_records_the_skipped_files(messy_tree, tmp_path):
    config = tiny_config(tmp_path / "run", messy_tree, "train.steps=10")
    job = _job(config, RecordingSync())
    summary = job.run().summary
    assert summary.num_classes == 3
    assert job.prepared.computed == 3 * PER_CLASS  # every WebP decoded by the extraction: none undecodable
    recorded = json.loads((config.run_dir / "summary.json").read_text(encoding="utf-8"))
    assert {s["path"] for s in recorded["skipped_images"]} == set(EXPECTED_REASONS)


@pytest.mark.parametrize("mode, options", [("RGB", {}), ("RGB", {"lossless": True}), ("RGBA", {})])
def test_webp_decodes_to_the_same_pixels_as_pillow(mode, options):
    import tensorflow as tf
    from runner.features.backbones import decode_and_resize
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 40, len(mode)), dtype=np.uint8), mode)
    data = webp_bytes(image, **options)
    expected = tf.image.resize(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), (32, 32))
    np.testing.assert_array_equal(decode_and_resize(tf.constant(data), 32).numpy(), expected.numpy())


def test_an_animated_webp_is_refused_by_the_decoder_not_a_crash():
    import tensorflow as tf
    from runner.features.backbones import decode_and_resize
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    data = webp_bytes(frames[0], save_all=True, append_images=frames[1:])
    with pytest.raises(tf.errors.InvalidArgumentError, match="animated WebP"):
        decode_and_resize(tf.constant(data), 32)
