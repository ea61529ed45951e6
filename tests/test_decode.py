"""Decoding at the size the backbone needs: DCT ratio choice, the same pixels in extraction and export,
and the GPU path (mixed precision, XLA, prefetch to device) computing the same vectors on a CPU."""
from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CLOTHING, MOBILENET_WEIGHTS


def encoded(width: int, height: int, fmt: str = "JPEG", source: Path | None = None) -> bytes:
    """A real photo (or a gradient) resized to width x height and encoded as fmt."""
    if source is not None:
        image = Image.open(source).convert("RGB").resize((width, height), Image.BICUBIC)
    else:
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
        image = Image.fromarray(np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def backbone(shared_assets):
    from runner.features.backbones import build_backbone
    from runner.run.config import BackboneConfig
    return build_backbone(BackboneConfig(name="mobilenet", weights=str(MOBILENET_WEIGHTS), alpha=0.25))


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory, shared_assets):
    """Six real clothing photos re-encoded at phone size (2,400 x 1,800 and portrait), plus one large PNG."""
    root = tmp_path_factory.mktemp("large")
    sources = sorted(CLOTHING.glob("*/*.jpg"))[::300][:6]
    paths = []
    for i, source in enumerate(sources):
        width, height = (2400, 1800) if i % 2 == 0 else (1800, 2400)
        paths.append(root / f"photo_{i}.jpg")
        paths[-1].write_bytes(encoded(width, height, source=source))
    paths.append(root / "photo.png")
    paths[-1].write_bytes(encoded(1200, 900, "PNG", source=sources[0]))
    return paths


@pytest.mark.parametrize("height, width, ratio", [
    (224, 300, 1), (446, 1000, 1), (447, 600, 2),  # libjpeg rounds up: ceil(447 / 2) = 224
    (448, 500, 2), (892, 900, 2), (893, 2000, 4), (1784, 3000, 4), (1785, 2400, 8),
    (1800, 2400, 8), (2400, 1800, 8), (3000, 4000, 8),
])
def test_the_largest_dct_ratio_that_keeps_both_sides_at_least_the_input_size_is_chosen(height, width, ratio):
    import tensorflow as tf
    from runner.features.backbones import JPEG_RATIOS, jpeg_ratio_index
    chosen = JPEG_RATIOS[int(jpeg_ratio_index(tf.constant(height), tf.constant(width), 224))]
    assert chosen == ratio
    decoded = tf.io.decode_jpeg(encoded(width, height), ratio=chosen).shape
    assert min(decoded[0], decoded[1]) >= 224, decoded
    if chosen < 8:  # the next ratio would be too small
        assert min(-(-height // (2 * chosen)), -(-width // (2 * chosen))) < 224


def test_a_large_jpeg_is_decoded_at_its_dct_ratio_and_other_formats_by_the_general_decoder(large_photos):
    import tensorflow as tf
    from runner.features.backbones import decode_and_resize
    jpeg = large_photos[0].read_bytes()
    expected = tf.image.resize(tf.io.decode_jpeg(jpeg, channels=3, ratio=8), (224, 224))
    np.testing.assert_array_equal(decode_and_resize(tf.constant(jpeg), 224).numpy(), expected.numpy())
    png = large_photos[-1].read_bytes()
    expected = tf.image.resize(tf.io.decode_image(png, channels=3, expand_animations=False), (224, 224))
    np.testing.assert_array_equal(decode_and_resize(tf.constant(png), 224).numpy(), expected.numpy())


def test_photos_smaller_than_twice_the_input_size_decode_exactly_as_before(shared_assets):
    import tensorflow as tf
    from runner.features.backbones import decode_and_resize
    for path in sorted(CLOTHING.glob("*/*.jpg"))[:5]:
        data = path.read_bytes()
        before = tf.image.resize(tf.io.decode_image(data, channels=3, expand_animations=False), (224, 224))
        np.testing.assert_array_equal(decode_and_resize(tf.constant(data), 224).numpy(), before.numpy())


def extract_into_cache(paths: list[Path], backbone, cache_dir: Path):
    """The runner's extraction of `paths` into a fresh cache: (cache, content hashes)."""
    import tensorflow as tf
    from runner.features.cache import BottleneckCache
    from runner.data.scan import ImageRecord
    from runner.features.extract import extract_missing
    keys = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    records = [ImageRecord(str(p), p.name, 0, "train", k) for p, k in zip(paths, keys)]
    cache = BottleneckCache(cache_dir, backbone.cache_identity, backbone.feature_dim)
    assert extract_missing(records, backbone, cache, tf.distribute.get_strategy(), 3, 100, "lines") == len(paths)
    return cache, keys


def test_export_and_cached_vectors_agree_on_large_jpegs(backbone, large_photos, tmp_path):
    """Training reads the cached vectors, serving decodes inside the exported graph: same pixels, same
    outputs (up to the cache's float16 storage)."""
    import tensorflow as tf
    from runner.run.config import Config
    from runner.export.exporter import Classifier, RunModel, write_tf1_graphs
    from runner.training.head import build_head
    cache, keys = extract_into_cache(large_photos, backbone, tmp_path / "cache")
    cached = cache.table(keys).all()
    head = build_head(5, backbone.feature_dim, Config().head, 0)
    head.logits.kernel.assign(head.logits.kernel * 20.0)  # confident, image-dependent probabilities
    classifier = Classifier(RunModel(Config(), list("abcde"), None, backbone, head))
    tf.saved_model.save(classifier, str(tmp_path / "export"),
                        signatures={"serving_default": classifier.serve.get_concrete_function()})
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    images = [p.read_bytes() for p in large_photos]
    served = serve(images=tf.constant(images))["probabilities"].numpy()
    from_cache = tf.nn.softmax(head(cached)).numpy()
    assert served.std(axis=0).max() > 0.05, "the probabilities should differ from image to image"
    np.testing.assert_allclose(served, from_cache, atol=5e-3)
    names = write_tf1_graphs(classifier, tmp_path / "export")  # the frozen graph decodes the same way
    graph_def = tf.compat.v1.GraphDef.FromString((tmp_path / "export" / names["frozen_graph"]).read_bytes())
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        tf.compat.v1.import_graph_def(graph_def, name="")
        tf1 = session.run(names["probabilities"], {names["input"]: images})
    np.testing.assert_allclose(tf1, from_cache, atol=5e-3)
    # and the check is sharp: the naive full-size decode gives other vectors than the cache holds
    naive = np.stack([backbone.model(tf.image.resize(tf.io.decode_image(p.read_bytes(), channels=3,
                                                                        expand_animations=False)[None], (224, 224)))[0]
                      for p in large_photos[:-1]])
    assert np.abs(naive - cached[:-1]).max() > 10 * np.abs(cached[:-1]).max() * 1e-3


def test_mixed_precision_extraction_stores_float32_sized_vectors_close_to_float32(backbone, large_photos, tmp_path):
    import keras
    import tensorflow as tf
    from runner.features.backbones import extraction_model
    from runner.features.extract import make_forward
    images = tf.stack([tf.image.resize(tf.io.decode_jpeg(p.read_bytes(), channels=3, ratio=8), (224, 224))
                       for p in large_photos[:3]])
    reference = backbone.model(images).numpy()
    half = replace(backbone, config=replace(backbone.config, mixed_precision=True))
    model = extraction_model(half)
    assert keras.config.dtype_policy().name == "float32", "the global policy must be left as it was"
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert any(layer.compute_dtype == "float16" for layer in base.layers)
    vectors, positions = make_forward(half, tf.distribute.get_strategy())(images, tf.range(3, dtype=tf.int64))
    assert vectors.dtype == tf.float32 and positions.numpy().tolist() == [0, 1, 2]
    np.testing.assert_allclose(vectors.numpy(), reference, rtol=0.05, atol=0.02 * np.abs(reference).max())


def test_xla_forward_and_device_prefetch_give_the_same_vectors(backbone, large_photos):
    import tensorflow as tf
    from runner.features.extract import image_pipeline, make_forward, to_devices
    strategy = tf.distribute.get_strategy()
    paths = [str(p) for p in large_photos[:4]]
    plain = [(v.numpy(), p.numpy()) for v, p in (make_forward(backbone, strategy)(*batch)
                                                 for batch in image_pipeline(paths, 224, 2))]
    xla_backbone = replace(backbone, config=replace(backbone.config, xla=True))
    forward = make_forward(xla_backbone, strategy)
    on_device = to_devices(image_pipeline(paths, 224, 2), strategy, device="/cpu:0")
    compiled = [(v.numpy(), p.numpy()) for v, p in (forward(*batch) for batch in on_device)]
    assert [p.tolist() for _, p in compiled] == [p.tolist() for _, p in plain] == [[0, 1], [2, 3]]
    for (a, _), (b, _) in zip(compiled, plain):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_a_slow_end_of_extraction_is_reported_with_its_phase(caplog):
    from runner.features.extract import report_slow_end
    report_slow_end(0.1, 0.2)
    assert not caplog.records
    report_slow_end(14.0, 0.1)
    report_slow_end(0.1, 21.0)
    messages = [r.getMessage() for r in caplog.records]
    assert "pipeline took 14.0 s" in messages[0] and "last cache shard took 21.0 s" in messages[1]
