"""The backbone registry: every backbone feeds its keras.applications model the input keras documents, gives
vectors of its declared length, loads a local weights file, has its own cache identity, and runs end to end
(extraction → head → SavedModel and the seed's TF1 MetaGraph on JPEG bytes, one backbone per family). Random weights at 32 px keep each backbone to seconds; the
end-to-end runs and the larger members of a family are marked slow."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner.run.config import BACKBONE_NAMES, BackboneConfig, load_config
from tests.helpers import cached_split, latest_checkpoint_prefix, write_synthetic_dataset
from tests.test_export import seed_session_run

SIZE = 32  # the smallest input every keras.applications model here accepts (inception_v3 excepted)

# what keras.applications documents as the input of each family (written out here, not taken from the registry)
DOCUMENTED_INPUT = {
    "efficientnet_v2": lambda pixels: pixels,           # [0, 255]: include_preprocessing=True rescales inside
    "convnext": lambda pixels: pixels,                  # [0, 255]: a Normalization layer inside the model
    "resnet50_v2": lambda pixels: pixels / 127.5 - 1.0,  # resnet_v2.preprocess_input: [-1, 1]
}
CONSTRUCTORS = {
    "efficientnet_v2_b0": "EfficientNetV2B0", "efficientnet_v2_b1": "EfficientNetV2B1",
    "efficientnet_v2_b2": "EfficientNetV2B2", "efficientnet_v2_b3": "EfficientNetV2B3",
    "efficientnet_v2_s": "EfficientNetV2S", "convnext_tiny": "ConvNeXtTiny", "convnext_small": "ConvNeXtSmall",
    "resnet50_v2": "ResNet50V2",
}
FAMILY_REPRESENTATIVES = ("efficientnet_v2_b0", "convnext_tiny", "resnet50_v2")  # one per preprocessing
HEAVIER = pytest.mark.slow  # the other members repeat their family's code path with more layers


def new_backbones() -> list:
    """Every new backbone, the heavier members of a family marked slow."""
    return [name if name in FAMILY_REPRESENTATIVES else pytest.param(name, marks=HEAVIER) for name in CONSTRUCTORS]


def family(name: str) -> str:
    return next(prefix for prefix in DOCUMENTED_INPUT if name.startswith(prefix))


def random_pixels(count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, 3)).astype(np.float32)


def test_every_backbone_users_can_name_is_in_the_registry_under_its_keras_applications_name():
    import keras
    from runner.features.backbones import REGISTRY
    assert set(BACKBONE_NAMES) == set(REGISTRY)
    for name, constructor in CONSTRUCTORS.items():
        assert REGISTRY[name].constructor is getattr(keras.applications, constructor)


@pytest.mark.parametrize("name", new_backbones())
def test_a_local_weights_file_gives_the_features_of_the_keras_model_fed_as_keras_documents(name, tmp_path):
    """The test saves a keras.applications model's weights; backbone.weights = that file gives the same vectors
    as the keras model on its documented input, of the declared length."""
    import keras
    from runner.features.backbones import REGISTRY, build_backbone
    keras.utils.set_random_seed(1)
    reference = getattr(keras.applications, CONSTRUCTORS[name])(include_top=False, weights=None, pooling="avg",
                                                                input_shape=(SIZE, SIZE, 3))
    weights = tmp_path / f"{name}.weights.h5"
    reference.save_weights(weights)

    backbone = build_backbone(BackboneConfig(name=name, weights=str(weights), image_size=SIZE))
    pixels = random_pixels()
    features = backbone.model.predict(pixels, verbose=0)
    assert features.shape == (len(pixels), REGISTRY[name].feature_dim) and backbone.feature_dim == features.shape[1]
    expected = reference.predict(DOCUMENTED_INPUT[family(name)](pixels), verbose=0)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(features - features[:1]).max() > 0, "different images must give different vectors"
    assert backbone.cache_identity["weights"].startswith("sha256:")


def test_each_backbone_has_its_own_cache_identity():
    from runner.features.backbones import cache_identity
    from runner.features.cache import identity_hash
    configs = [BackboneConfig(name=name, weights="none", image_size=SIZE) for name in BACKBONE_NAMES]
    folders = {identity_hash(cache_identity(config)) for config in configs}
    assert len(folders) == len(BACKBONE_NAMES)
    default_size = cache_identity(BackboneConfig(name="efficientnet_v2_s", weights="none"))
    assert default_size["image_size"] == 384  # keras.applications.EfficientNetV2S's default input size


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("two-classes"), num_classes=2, per_class=8, size=48)


@pytest.mark.slow  # builds the backbone twice and writes a SavedModel: tens of seconds per backbone on a CPU
@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)  # the others differ from theirs only in depth and width
def test_a_random_backbone_runs_end_to_end_and_its_saved_model_classifies_jpeg_bytes_like_the_head(
        name, two_classes, tmp_path):
    """backbone.weights = none: extraction → head → export; the SavedModel's probabilities on the JPEG bytes are
    the trained head's on the cached vectors, so export and extraction feed the backbone alike."""
    import tensorflow as tf
    from runner.features.backbones import REGISTRY
    from runner.training.head import build_head
    from runner.job import Job
    from runner.run.results import Finished
    from tests.test_job import RecordingSync
    run_dir = tmp_path / "run"
    config = load_config(None, [
        f"data.dir={two_classes}", f"run.dir={run_dir}", f"backbone.name={name}", "backbone.weights=none",
        "backbone.allow_random_weights=true", f"backbone.image_size={SIZE}", "cache.dtype=float32",
        "data.min_images_per_class=2", "split.validation_percent=25", "split.test_percent=25",
        "head.search=off", "train.steps=6", "checkpoint.every_steps=6", "checkpoint.every_seconds=0",
        "train.progress=lines", "export.enabled=true", "export.formats=saved_model,meta_graph,labels"])
    outcome = Job(config, RecordingSync()).run()
    assert isinstance(outcome, Finished) and outcome.summary.global_step == 6

    export = run_dir / "export"
    info = json.loads((export / "model.json").read_text())
    assert info["input_size"] == SIZE and info["backbone"]["name"] == name
    assert info["backbone"]["feature_dim"] == REGISTRY[name].feature_dim
    vectors, _, records = cached_split(run_dir, config.cache_dir, "train")
    assert vectors.shape[1] == REGISTRY[name].feature_dim
    classes = (export / "labels.txt").read_text().split()
    head = build_head(len(classes), vectors.shape[1], config.head, config.train.seed)
    tf.train.Checkpoint(head=head).read(latest_checkpoint_prefix(run_dir)).expect_partial()
    expected = tf.nn.softmax(head(vectors, training=False)).numpy()

    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    outputs = serve(images=tf.constant([Path(r.path).read_bytes() for r in records]))
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-4)
    assert [c.decode() for c in outputs["top_k_classes"].numpy()[:, 0]] == [classes[i] for i in expected.argmax(1)]
    seed_probabilities, _ = seed_session_run(export, [Path(r.path).read_bytes() for r in records])
    np.testing.assert_allclose(seed_probabilities, expected, atol=1e-4)  # the seed's TF1 lines, same model
