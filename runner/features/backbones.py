"""Frozen backbones: the keras.applications registry (name → constructor, size, preprocessing), and KerasHub
presets (runner/features/kerashub.py) for every other backbone.name."""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf

from common.files import file_digest
from runner.run.config import BackboneConfig
from runner.errors import RunnerError

log = logging.getLogger("runner")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one keras.applications model and feed it."""
    constructor: Callable
    preprocess: Callable        # float images in [0, 255] → what the constructor's model expects
    default_size: int
    feature_dim: int            # length of the pooled vector (at alpha = 1 where the backbone takes one)
    takes_alpha: bool = False
    include_preprocessing: bool = False  # pass include_preprocessing=True: the model takes [0, 255] itself


apps = keras.applications
REGISTRY: dict[str, BackboneSpec] = {
    "inception_v3": BackboneSpec(apps.InceptionV3, apps.inception_v3.preprocess_input, 299, 2048),
    "mobilenet_v2": BackboneSpec(apps.MobileNetV2, apps.mobilenet_v2.preprocess_input, 224, 1280, takes_alpha=True),
    "mobilenet": BackboneSpec(apps.MobileNet, apps.mobilenet.preprocess_input, 224, 1024, takes_alpha=True),
    "efficientnet_b0": BackboneSpec(apps.EfficientNetB0, apps.efficientnet.preprocess_input, 224, 1280),
    "resnet50": BackboneSpec(apps.ResNet50, apps.resnet50.preprocess_input, 224, 2048),
    "resnet50_v2": BackboneSpec(apps.ResNet50V2, apps.resnet_v2.preprocess_input, 224, 2048),  # to [-1, 1]
    # EfficientNetV2 and ConvNeXt rescale inside the model: their preprocess_input passes [0, 255] through
    **{name: BackboneSpec(constructor, apps.efficientnet_v2.preprocess_input, size, dim, include_preprocessing=True)
       for name, constructor, size, dim in (
           ("efficientnet_v2_b0", apps.EfficientNetV2B0, 224, 1280),
           ("efficientnet_v2_b1", apps.EfficientNetV2B1, 240, 1280),
           ("efficientnet_v2_b2", apps.EfficientNetV2B2, 260, 1408),
           ("efficientnet_v2_b3", apps.EfficientNetV2B3, 300, 1536),
           ("efficientnet_v2_s", apps.EfficientNetV2S, 384, 1280))},
    **{name: BackboneSpec(constructor, apps.convnext.preprocess_input, 224, 768, include_preprocessing=True)
       for name, constructor in (("convnext_tiny", apps.ConvNeXtTiny), ("convnext_small", apps.ConvNeXtSmall))},
}


@dataclass
class Backbone:
    """A built, frozen feature extractor: float images in [0, 255] → pooled vectors."""
    name: str
    image_size: int
    model: keras.Model          # includes preprocessing; input (None, S, S, 3) float32 in [0, 255]
    feature_dim: int
    cache_identity: dict        # everything the cached vectors depend on
    base: keras.Model           # the keras.applications model or KerasHub network inside `model`
    config: BackboneConfig      # what it was built from (extraction_model reads mixed_precision)
    decode: Callable = None     # encoded image bytes → float32 [S, S, 3] in [0, 255], as `model` takes them
    blocks: list | None = None  # KerasHub: the transformer blocks fine-tuning unfreezes from the top
    tail: list | None = None    # KerasHub: the layers after the blocks (final norm, pooling, projection)
    family: str = "keras.applications"


def is_kerashub(config: BackboneConfig) -> bool:
    """Whether backbone.name is a KerasHub preset (name, handle or directory), not a keras.applications name."""
    return config.name not in REGISTRY


def image_size_for(config: BackboneConfig) -> int:
    """The configured input size, or the backbone's default (a KerasHub preset's: its image converter's)."""
    if is_kerashub(config):
        from runner.features import kerashub
        return kerashub.image_size_for(config)
    return config.image_size or REGISTRY[config.name].default_size


def weights_identity(config: BackboneConfig) -> str:
    """What the cached vectors' weights are: a file's sha256, or 'imagenet' / 'none'."""
    if config.weights in ("imagenet", "none"):
        return config.weights
    path = Path(config.weights)
    if not path.is_file():
        raise RunnerError(f"backbone.weights = {config.weights!r}: no such file. Use 'imagenet', 'none', or the "
                          f"path of a Keras weights file (.h5, .weights.h5 or .keras) for backbone {config.name}.")
    return "sha256:" + file_digest(path)


def cache_identity(config: BackboneConfig) -> dict:
    """Everything the cached vectors of `config` depend on: backbone name, weights, input size, alpha (a KerasHub
    preset: its family, the sha256 of its files, input size and feature; not its name or folder, so a preset
    copied elsewhere keeps its vectors)."""
    if is_kerashub(config):
        from runner.features import kerashub
        return {"backbone": "kerashub:" + kerashub.family(config), "weights": kerashub.weights_identity(config),
                "image_size": image_size_for(config), "alpha": None,
                "feature": kerashub.FAMILIES[kerashub.preset_class(config)][1]}
    return {"backbone": config.name, "weights": weights_identity(config), "image_size": image_size_for(config),
            "alpha": config.alpha if REGISTRY[config.name].takes_alpha else None}


MODERN_BACKBONES = "dinov2_small or dinov2_base (or siglip2_base_patch16_224, clip_vit_base_patch16)"


def suggest_backbone(config: BackboneConfig, gpus: list) -> str | None:
    """Advice for a run on a GPU with a keras.applications CNN: a KerasHub preset's frozen features are much
    better for a linear head, and the GPU makes them affordable."""
    if not gpus or is_kerashub(config):
        return None
    return (f"a GPU is visible: backbone.name = {MODERN_BACKBONES} gives frozen features that a linear head "
            f"classifies markedly better than {config.name}'s (docs/backbones.md; configs/colab_dinov2.toml); "
            f"set backbone.mixed_precision = true with it.")


RANDOM_WEIGHTS_SEED = 0


@contextmanager
def _reproducible_initialization():
    """Keras draws each unseeded initializer's seed from Python's `random`: a fixed state while the model is
    built makes backbone.weights = 'none' the same random backbone in every process (extraction, resume,
    export), so vectors cached by one process match the graph another exports."""
    state = random.getstate()
    random.seed(RANDOM_WEIGHTS_SEED)
    try:
        yield
    finally:
        random.setstate(state)


def _construct(config: BackboneConfig, weights: str | None) -> keras.Model:
    """The frozen keras.applications model (without top, average-pooled) of `config`."""
    spec = REGISTRY[config.name]
    size = image_size_for(config)
    kwargs = dict(input_shape=(size, size, 3), include_top=False, weights=weights, pooling="avg")
    if spec.takes_alpha:
        kwargs["alpha"] = config.alpha
    if spec.include_preprocessing:
        kwargs["include_preprocessing"] = True
    try:
        with _reproducible_initialization():
            base = spec.constructor(**kwargs)
    except Exception as e:  # h5py reports a damaged file as RuntimeError, KeyError, UnicodeDecodeError ...
        if config.weights in ("imagenet", "none") and not isinstance(e, (ValueError, OSError)):
            raise  # e.g. the ImageNet download failed: not the file's fault
        raise RunnerError(f"could not build backbone {config.name} with backbone.weights = {config.weights!r} "
                          f"(image_size={size}, alpha={config.alpha}): {type(e).__name__}: {str(e).rstrip('.')}. The weights file "
                          f"is damaged or is not Keras weights of this backbone, alpha and include_top=False: "
                          f"download it again, or fix backbone.weights.") from None
    base.trainable = False
    return base


def _with_preprocessing(config: BackboneConfig, base: keras.Model) -> keras.Model:
    """float32 images in [0, 255] → the backbone's preprocessing → base → float32 pooled vectors."""
    size = image_size_for(config)
    inputs = keras.Input((size, size, 3), dtype="float32")
    features = base(REGISTRY[config.name].preprocess(inputs), training=False)
    if features.dtype != "float32":  # a mixed-precision base computes and returns float16
        features = keras.ops.cast(features, "float32")
    return keras.Model(inputs, features, name=f"{config.name}_extractor")


def build_backbone(config: BackboneConfig) -> Backbone:
    """Construct the frozen backbone with its preprocessing folded into the model."""
    identity = cache_identity(config)
    weights = None if config.weights == "none" else config.weights
    if weights is None:
        log.warning("backbone.weights = 'none': the backbone is RANDOM. Its features carry no ImageNet "
                    "knowledge and the accuracy of this run means nothing.")
    size = identity["image_size"]
    if is_kerashub(config):
        from runner.features import kerashub
        with _reproducible_initialization():
            network = kerashub.build_network(config)
        network.model.trainable = False
        converter = network.converter
        return Backbone(config.name, size, network.model, int(network.model.outputs[0].shape[-1]), identity,
                        network.base, config, lambda data: kerashub.resize(converter, decode_image(data)),
                        network.blocks, network.tail, kerashub.family(config))
    base = _construct(config, weights)
    model = _with_preprocessing(config, base)
    return Backbone(config.name, size, model, int(model.outputs[0].shape[-1]), identity, base, config,
                    lambda data: decode_and_resize(data, size))


def extraction_model(backbone: Backbone) -> keras.Model:
    """The model bottleneck extraction runs: the backbone itself, or with backbone.mixed_precision a copy
    with the same weights computing in float16 (a KerasHub network: bfloat16 on GPUs that have it; its
    vectors are cast back to float32, stored as before)."""
    if not backbone.config.mixed_precision:
        return backbone.model
    if backbone.blocks is not None:
        from runner.features import kerashub
        half = kerashub.build_network(backbone.config, dtype=kerashub.mixed_policy(), load_weights=False).model
        half.set_weights(backbone.model.get_weights())
        if not tf.config.list_logical_devices("GPU"):
            log.warning("backbone.mixed_precision = true without a GPU: reduced precision on the CPU is slower "
                        "than float32; set it to false on this machine.")
        return half
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        half = _construct(backbone.config, None)
    finally:
        keras.config.set_dtype_policy(previous)
    half.set_weights(backbone.base.get_weights())
    if not tf.config.list_logical_devices("GPU"):
        log.warning("backbone.mixed_precision = true without a GPU: float16 on the CPU is slower than float32; "
                    "set it to false on this machine.")
    return _with_preprocessing(backbone.config, half)


JPEG_RATIOS = (1, 2, 4, 8)  # the scale-downs libjpeg applies in the DCT domain while decoding


def jpeg_ratio_index(height: tf.Tensor, width: tf.Tensor, size: int) -> tf.Tensor:
    """Index into JPEG_RATIOS of the largest ratio that keeps both sides of the decoded image >= size."""
    short = tf.minimum(height, width)
    # libjpeg rounds a scaled side up: ceil(short / r) >= size exactly when short > (size - 1) * r
    return tf.add_n([tf.cast(short > (size - 1) * r, tf.int32) for r in JPEG_RATIOS[1:]])


DECODED_FORMATS = "JPEG, PNG, GIF, BMP, WebP (still)"  # what decode_and_resize takes (docs, model.json)


def is_webp(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(whether the bytes are a WebP, whether its header declares an animation), from the first 21 bytes."""
    head = tf.strings.join([tf.strings.substr(image_bytes, 0, 21), "\0" * 21])  # never shorter than 21
    webp = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), "RIFF"),
                          tf.equal(tf.strings.substr(head, 8, 4), "WEBP"))
    flags = tf.io.decode_raw(tf.strings.substr(head, 20, 1), tf.uint8)[0]
    animated = tf.logical_and(tf.equal(tf.strings.substr(head, 12, 4), "VP8X"),
                              tf.not_equal(tf.bitwise.bitwise_and(flags, 2), 0))
    return webp, animated


def decode_image(image_bytes: tf.Tensor, size: int | None = None) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes → uint8 [height, width, 3].

    With `size`, a JPEG is decoded at the largest DCT scale-down (1/2, 1/4, 1/8) whose sides stay >= size,
    read from its header; without, at full resolution. A still WebP goes to TensorFlow's WebP decoder (its
    alpha dropped; an animated one is refused with InvalidArgumentError before decoding, which would crash
    TensorFlow 2.21); other formats take the general decoder."""
    def jpeg():
        if size is None:
            return tf.io.decode_jpeg(image_bytes, channels=3)
        shape = tf.io.extract_jpeg_shape(image_bytes)
        index = jpeg_ratio_index(shape[0], shape[1], size)
        return tf.switch_case(index, [lambda r=r: tf.io.decode_jpeg(image_bytes, channels=3, ratio=r)
                                      for r in JPEG_RATIOS])

    def webp():
        _, animated = is_webp(image_bytes)
        check = tf.debugging.Assert(tf.logical_not(animated), ["animated WebP is not supported"])
        with tf.control_dependencies([check]):
            frames = tf.io.decode_webp(tf.identity(image_bytes), channels=0)  # RGB or RGBA, as encoded
        return tf.ensure_shape(frames[0, :, :, :3], (None, None, 3))

    def other():
        return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, lambda: tf.cond(is_webp(image_bytes)[0], webp, other))
    return tf.ensure_shape(image, (None, None, 3))


def decode_and_resize(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded image bytes → float32 [size, size, 3] in [0, 255]: decode_image at a JPEG DCT scale-down, then
    a bilinear resize. The keras.applications backbones' Backbone.decode, used for extraction, fine-tuning
    and the exported graph, so all of them see the same pixels."""
    image = tf.image.resize(decode_image(image_bytes, size), (size, size), method="bilinear")
    return tf.ensure_shape(image, (size, size, 3))
