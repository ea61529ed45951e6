"""KerasHub backbones (DINOv2, DINOv3, SigLIP, CLIP) from local presets: the in-graph path gives KerasHub's own
features, the cache key follows the preset's files, and each family runs end to end (extraction → head →
SavedModel + the seed's TF1 lines + TFLite + classify); a ViT fine-tuning stage resumes bit-identically after
SIGKILL. The presets are tiny random networks saved with KerasHub's own save_to_preset (no network needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner.run.config import BackboneConfig, load_config
from tests.helpers import (CLOTHING, assert_same_checkpoint, cached_split, checkpoint_values, latest_checkpoint_prefix,
                           random_steps, run_resume, sigkill_after_checkpoints)

SIZE = 32        # the presets' image size: two 16-pixel patches a side
FAMILIES = ("dinov2", "dinov3", "siglip", "clip")
FEATURE_TOLERANCE = 1e-5  # relative to the largest feature value: the same float32 ops in the same order
# ImageNet mean and std as DINO's converters fold them into scale and offset (a preset detail the runner reads)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def save_tiny_preset(family: str, folder: Path, seed: int) -> Path:
    """A random two-block network of `family` and its image converter, saved with KerasHub's save_to_preset."""
    import keras
    import keras_hub
    keras.utils.set_random_seed(seed)
    block = dict(num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32)
    text = dict(vocabulary_size=10, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
                max_sequence_length=8)
    if family == "dinov2":
        backbone = keras_hub.models.DINOV2Backbone(patch_size=16, num_register_tokens=2, image_shape=(SIZE, SIZE, 3),
                                                   position_embedding_shape=(SIZE, SIZE, 3), **block)
        converter = keras_hub.layers.DINOV2ImageConverter(
            image_size=(SIZE, SIZE), scale=[1 / (255 * s) for s in STD], offset=[-m / s for m, s in zip(MEAN, STD)],
            interpolation="bicubic")
    elif family == "dinov3":
        backbone = keras_hub.models.DINOV3Backbone(patch_size=16, num_register_tokens=4, image_shape=(SIZE, SIZE, 3),
                                                   **block)
        converter = keras_hub.layers.DINOV3ImageConverter(image_size=(SIZE, SIZE), scale=1 / 255.0)
    elif family == "siglip":
        backbone = keras_hub.models.SigLIPBackbone(
            keras_hub.models.SigLIPVisionEncoder(patch_size=16, image_shape=(SIZE, SIZE, 3), **block),
            keras_hub.models.SigLIPTextEncoder(**text))
        converter = keras_hub.layers.SigLIPImageConverter(image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1.0)
    else:
        backbone = keras_hub.models.CLIPBackbone(
            keras_hub.models.CLIPVisionEncoder(patch_size=16, image_shape=(SIZE, SIZE, 3), **block),
            keras_hub.models.CLIPTextEncoder(**text), projection_dim=8)
        converter = keras_hub.layers.CLIPImageConverter(image_size=(SIZE, SIZE), scale=1 / 255.0)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_presets(tmp_path_factory) -> dict[str, Path]:
    """One tiny preset per family, and 'dinov2_other': the DINOv2 architecture with other random weights."""
    root = tmp_path_factory.mktemp("kerashub-presets")
    presets = {family: save_tiny_preset(family, root / family, seed) for seed, family in enumerate(FAMILIES)}
    presets["dinov2_other"] = save_tiny_preset("dinov2", root / "dinov2_other", seed=99)
    return presets


@pytest.fixture(scope="session")
def three_classes(tmp_path_factory) -> Path:
    """Three clothing classes, six photos each (links into ../shared, nothing copied)."""
    root = tmp_path_factory.mktemp("clothing-3x6")
    for folder in sorted(p for p in CLOTHING.iterdir() if p.is_dir())[:3]:
        (root / folder.name).mkdir()
        for photo in sorted(folder.glob("*.jpg"))[:6]:
            (root / folder.name / photo.name).symlink_to(photo)
    return root


def photos(count: int) -> list[Path]:
    return sorted(CLOTHING.glob("*/*.jpg"))[:count]


def kerashub_reference(preset: Path, family: str, image_bytes: list[bytes]) -> np.ndarray:
    """KerasHub's own path: its ImageConverter on the decoded image, its backbone, the family's feature."""
    import keras_hub
    import tensorflow as tf
    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    converter = keras_hub.layers.ImageConverter.from_preset(str(preset))
    out = []
    for data in image_bytes:
        images = converter(tf.io.decode_jpeg(data, channels=3)[None])
        if family.startswith("dino"):
            (key,) = backbone.input.keys()
            tokens = backbone({key: images}).numpy()[0]
            out.append(np.concatenate([tokens[0], tokens[1 + backbone.num_register_tokens:].mean(axis=0)]))
        else:
            out.append(backbone.get_vision_embeddings(images).numpy()[0])
    return np.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_in_graph_features_equal_kerashub_converter_and_backbone(family, tiny_presets):
    """decode → the preset's resizing → scale/offset → network → feature, as the runner's graph computes it,
    gives what KerasHub's ImageConverter + backbone give on the same (non-square) photos."""
    import tensorflow as tf
    from runner.features.backbones import build_backbone
    backbone = build_backbone(BackboneConfig(name=str(tiny_presets[family])))
    data = [path.read_bytes() for path in photos(3)]
    ours = np.stack([backbone.model(backbone.decode(tf.constant(d))[None]).numpy()[0] for d in data])
    expected = kerashub_reference(tiny_presets[family], family, data)
    assert ours.shape == expected.shape == (3, backbone.feature_dim)
    np.testing.assert_allclose(ours, expected, atol=FEATURE_TOLERANCE * np.abs(expected).max())
    assert np.abs(ours - ours[:1]).max() > 0, "different photos must give different vectors"


def test_dino_features_are_class_token_and_mean_patch_token_without_registers(tiny_presets):
    """The DINOv2 linear-evaluation feature: [class token, mean of patch tokens], twice the width."""
    from runner.features.backbones import build_backbone
    backbone = build_backbone(BackboneConfig(name=str(tiny_presets["dinov2"])))
    assert backbone.feature_dim == 2 * 16 and backbone.family == "DINOv2"
    assert backbone.cache_identity["feature"] == "class token + mean patch token"


def test_cache_key_differs_across_presets_weights_and_sizes_and_not_across_copies(tiny_presets, tmp_path):
    import shutil
    from runner.features.backbones import cache_identity
    from runner.features.cache import identity_hash

    def key(name: str, **kwargs) -> str:
        return identity_hash(cache_identity(BackboneConfig(name=name, **kwargs)))
    keys = {family: key(str(tiny_presets[family])) for family in (*FAMILIES, "dinov2_other")}
    assert len(set(keys.values())) == len(keys), "each preset, and other weights of one architecture, own a key"
    assert key(str(tiny_presets["dinov2"]), image_size=48) != keys["dinov2"]
    assert key(str(tiny_presets["dinov2"]), weights="none", allow_random_weights=True) != keys["dinov2"]
    copy = shutil.copytree(tiny_presets["dinov2"], tmp_path / "elsewhere")
    assert key(str(copy)) == keys["dinov2"], "a preset moved (e.g. to Drive) keeps its cached vectors"


@pytest.mark.parametrize("name, message", [
    ("vgg", "use one of: inception_v3, mobilenet_v2"),
    ("./no-such-preset", "could not open it as a preset"),
])
def test_a_name_that_is_neither_a_keras_application_nor_a_preset_is_refused(name, message, tmp_path):
    from common.errors import ProjectError
    from runner.features.backbones import build_backbone
    with pytest.raises(ProjectError, match=message):
        config = load_config(None, ["data.dir=x", f"run.dir={tmp_path}", f"backbone.name={name}"])
        build_backbone(config.backbone)


def test_a_kerashub_preset_of_another_family_is_refused_naming_it(tmp_path):
    import keras_hub
    from common.errors import ProjectError
    from runner.features.backbones import build_backbone
    keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                 mlp_dim=16).save_to_preset(str(tmp_path / "vit"))
    with pytest.raises(ProjectError, match=r"KerasHub ViTBackbone preset.*DINOv2, DINOv3, SigLIP / SigLIP 2 and CLIP"):
        build_backbone(BackboneConfig(name=str(tmp_path / "vit")))


def test_a_weights_file_with_a_preset_is_refused_naming_the_family(tiny_presets, tmp_path):
    from common.errors import ProjectError
    from runner.features.backbones import cache_identity
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"x")
    with pytest.raises(ProjectError, match="with the CLIP preset .* carries its own weights"):
        cache_identity(BackboneConfig(name=str(tiny_presets["clip"]), weights=str(weights)))


def test_fine_tuning_unfreezes_the_top_blocks_and_the_layers_after_them(tiny_presets):
    from runner.features.backbones import build_backbone
    from runner.run.config import FineTuneConfig
    from runner.training.finetune import unfreeze_top
    backbone = build_backbone(BackboneConfig(name=str(tiny_presets["clip"])))
    assert not backbone.model.trainable_weights
    unfreeze_top(backbone, FineTuneConfig(fraction=0.5))
    trainable = {id(w) for w in backbone.model.trainable_weights}
    last, first = backbone.blocks[-1], backbone.blocks[0]
    assert all(id(w) in trainable for w in last.weights) and not any(id(w) in trainable for w in first.weights)
    assert all(id(w) in trainable for layer in backbone.tail for w in layer.weights)


def run_config(data_dir: Path, run_dir: Path, preset: Path, *extra: str) -> list[str]:
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", f"backbone.name={preset}", "cache.dtype=float32",
            "data.min_images_per_class=2", "split.validation_percent=20", "split.test_percent=20",
            "head.search=off", "train.steps=6", "checkpoint.every_steps=6", "checkpoint.every_seconds=0",
            "train.progress=lines", *extra]


@pytest.mark.slow  # a Job, a SavedModel, TF1 graphs and a TFLite conversion per family
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_end_to_end_and_every_export_classifies_like_the_head(family, tiny_presets, three_classes,
                                                                               tmp_path):
    """The cached vectors through the trained head give what the SavedModel gives on the JPEG bytes, what the
    seed's TF1 lines give, what the TFLite file gives on the SavedModel's pixels, and what classify prints."""
    import tensorflow as tf
    from runner.export.classify import ExportedModel, classify_files
    from runner.job import Job
    from runner.run.results import Finished
    from runner.training.head import build_head
    from tests.test_export import seed_session_run
    from tests.test_job import RecordingSync
    from tests.test_tflite_export import tflite_outputs
    run_dir = tmp_path / "run"
    config = load_config(None, run_config(three_classes, run_dir, tiny_presets[family], "export.enabled=true",
                                          "export.formats=saved_model,meta_graph,tflite,labels"))
    outcome = Job(config, RecordingSync()).run()
    assert isinstance(outcome, Finished) and outcome.summary.global_step == 6

    export = run_dir / "export"
    info = json.loads((export / "model.json").read_text(encoding="utf-8"))
    assert info["input_size"] == SIZE
    vectors, _, records = cached_split(run_dir, config.cache_dir, "test")
    classes = (export / "labels.txt").read_text(encoding="utf-8").split()
    head = build_head(len(classes), vectors.shape[1], config.head, config.train.seed)
    tf.train.Checkpoint(head=head).read(latest_checkpoint_prefix(run_dir)).expect_partial()
    expected = tf.nn.softmax(head(vectors, training=False)).numpy()

    image_bytes = [Path(r.path).read_bytes() for r in records]
    loaded = tf.saved_model.load(str(export))
    outputs = loaded.signatures["serving_default"](images=tf.constant(image_bytes))
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-4)
    seed_probabilities, _ = seed_session_run(export, image_bytes)
    np.testing.assert_allclose(seed_probabilities, expected, atol=1e-4)

    from runner.features.backbones import build_backbone
    decode = build_backbone(config.backbone).decode
    pixels = np.stack([decode(tf.constant(d)).numpy() for d in image_bytes])
    on_pixels = loaded.signatures["classify_pixels"](pixels=tf.constant(pixels))["probabilities"].numpy()
    tflite, _ = tflite_outputs(export / info["tflite"]["float"], pixels)
    np.testing.assert_allclose(tflite, on_pixels, atol=1e-4)

    results = classify_files(ExportedModel(export), [Path(r.path) for r in records], top_k=1)
    assert [r.predictions[0][0] for r in results] == [classes[i] for i in expected.argmax(1)]


@pytest.mark.slow  # four resume.py processes
def test_fine_tuning_a_vit_killed_at_random_steps_resumes_to_identical_weights(tiny_presets, three_classes,
                                                                               tmp_path):
    finetune = ("train.deterministic=true", "fine_tune.enabled=true", "fine_tune.steps=12", "fine_tune.batch_size=4",
                "fine_tune.fraction=0.5", "checkpoint.every_steps=3", "eval.every_steps=6", "export.enabled=false")

    def args(run_dir: Path) -> list[str]:
        out = []
        for item in run_config(three_classes, run_dir, tiny_presets["dinov2"], *finetune):
            out += ["--set", item]
        return out

    def finetune_prefix(run_dir: Path) -> str:
        markers = sorted((run_dir / "finetune" / "checkpoints").glob("ckpt-*.json"),
                         key=lambda p: int(p.stem.split("-")[1]))
        return str(markers[-1].with_suffix(""))

    unbroken = tmp_path / "unbroken"
    result = run_resume(*args(unbroken))
    assert result.returncode == 0, result.stdout
    broken = tmp_path / "broken"
    sigkill_after_checkpoints(args(broken), "finetune", random_steps(3, 12, count=2, seed=5))
    result = run_resume(*args(broken))
    assert result.returncode == 0, result.stdout
    assert "resumed from fine-tuning step" in result.stdout
    head_only = checkpoint_values(latest_checkpoint_prefix(unbroken))
    assert len(checkpoint_values(finetune_prefix(unbroken))) > len(head_only) + 4, "the ViT blocks are trained"
    assert_same_checkpoint(finetune_prefix(unbroken), finetune_prefix(broken))


def test_the_colab_gpu_config_names_a_dinov2_preset_in_reduced_precision():
    from runner.features.backbones import is_kerashub
    from tests.helpers import REPO
    config = load_config(REPO / "configs" / "flowers_dinov2.toml")
    assert is_kerashub(config.backbone) and config.backbone.name.startswith("dinov2_")
    assert config.backbone.mixed_precision and config.cache.batch_size == 0


def test_mixed_precision_extraction_gives_float32_vectors_near_the_float32_ones(tiny_presets):
    """backbone.mixed_precision: the same preset weights computing in float16 / bfloat16, vectors cast back."""
    import tensorflow as tf
    from runner.features.backbones import build_backbone, extraction_model
    backbone = build_backbone(BackboneConfig(name=str(tiny_presets["siglip"]), mixed_precision=True))
    reduced = extraction_model(backbone)
    assert reduced is not backbone.model
    assert {layer.dtype_policy.name for layer in reduced._flatten_layers(include_self=False)
            if layer.weights} == {"mixed_bfloat16"}
    pixels = tf.stack([backbone.decode(tf.constant(p.read_bytes())) for p in photos(3)])
    exact, approximate = backbone.model(pixels).numpy(), reduced(pixels).numpy()
    assert approximate.dtype == np.float32
    np.testing.assert_allclose(approximate, exact, atol=0.05 * np.abs(exact).max())  # bfloat16: 8 mantissa bits


def test_a_gpu_run_with_a_cnn_is_advised_a_modern_preset_and_batches_grow_on_a_gpu(monkeypatch):
    import tensorflow as tf
    from runner.features.backbones import suggest_backbone
    from runner.features.distribute import CPU_BATCH, GPU_BATCH, extraction_batch_size
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    assert "dinov2_small" in suggest_backbone(BackboneConfig(name="mobilenet_v2"), [gpu])
    assert suggest_backbone(BackboneConfig(name="mobilenet_v2"), []) is None
    assert suggest_backbone(BackboneConfig(name="dinov2_small"), [gpu]) is None
    assert extraction_batch_size(7) == 7
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    assert extraction_batch_size(0) == GPU_BATCH
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert extraction_batch_size(0) == CPU_BATCH


@pytest.mark.slow  # DirectRunner worker processes
def test_beam_extraction_with_a_preset_gives_the_local_extraction_vectors(tiny_presets, three_classes, tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("apache_beam")  # a guard only: CI installs requirements-beam.txt
    import tensorflow as tf
    from runner.data.scan import HashIndex, scan_dataset
    from runner.features.backbones import build_backbone
    from runner.features.beam import extract_with_beam
    from runner.features.cache import BottleneckCache
    from runner.features.extract import extract_missing
    from tests.helpers import REPO
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    config = load_config(None, run_config(three_classes, tmp_path / "run", tiny_presets["dinov3"],
                                          "cache.shard_size=4"))
    assert extract_with_beam(config, ["--direct_num_workers", "1"]) == 18
    backbone = build_backbone(config.backbone)
    beam_cache = BottleneckCache(config.cache_dir, backbone.cache_identity, backbone.feature_dim, "float32")
    dataset = scan_dataset(config.data.dir, 20, 20, HashIndex(tmp_path / "hashes.json"), 2, "lines")
    local = BottleneckCache(tmp_path / "local", backbone.cache_identity, backbone.feature_dim, "float32")
    extract_missing(dataset.images, backbone, local, tf.distribute.get_strategy(), 8, 4, "lines")
    keys = sorted(k.decode() for k in local.index)
    assert sorted(k.decode() for k in beam_cache.index) == keys and len(keys) == 18
    np.testing.assert_allclose(beam_cache.table(keys).all(), local.table(keys).all(), atol=1e-5)


def test_an_alpha_set_for_a_backbone_without_one_is_warned(tiny_presets, tmp_path):
    from runner.run.config import ignored_settings
    config = load_config(None, ["data.dir=x", f"run.dir={tmp_path}", f"backbone.name={tiny_presets['dinov2']}",
                                "backbone.alpha=0.5"])
    assert any("backbone.alpha = 0.5 has no effect" in w and "mobilenet" in w for w in ignored_settings(config))
    mobilenet = load_config(None, ["data.dir=x", f"run.dir={tmp_path}", "backbone.name=mobilenet",
                                   "backbone.alpha=0.5"])
    assert not any("backbone.alpha" in w for w in ignored_settings(mobilenet))
