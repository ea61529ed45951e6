"""Registry of frozen ImageNet backbones: name → keras.applications constructor, size, preprocessing."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf

from common.files import file_digest
from runner.config import BackboneConfig
from runner.errors import RunnerError

log = logging.getLogger("runner")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one keras.applications model and feed it."""
    constructor: Callable
    preprocess: Callable
    default_size: int
    takes_alpha: bool = False


REGISTRY: dict[str, BackboneSpec] = {
    "inception_v3": BackboneSpec(keras.applications.InceptionV3,
                                 keras.applications.inception_v3.preprocess_input, 299),
    "mobilenet_v2": BackboneSpec(keras.applications.MobileNetV2,
                                 keras.applications.mobilenet_v2.preprocess_input, 224, takes_alpha=True),
    "mobilenet": BackboneSpec(keras.applications.MobileNet,
                              keras.applications.mobilenet.preprocess_input, 224, takes_alpha=True),
    "efficientnet_b0": BackboneSpec(keras.applications.EfficientNetB0,
                                    keras.applications.efficientnet.preprocess_input, 224),
    "resnet50": BackboneSpec(keras.applications.ResNet50,
                             keras.applications.resnet50.preprocess_input, 224),
}


@dataclass
class Backbone:
    """A built, frozen feature extractor: float images in [0, 255] → pooled vectors."""
    name: str
    image_size: int
    model: keras.Model          # includes preprocessing; input (None, S, S, 3) float32 in [0, 255]
    feature_dim: int
    cache_identity: dict        # everything the cached vectors depend on
    base: keras.Model           # the keras.applications model inside `model` (its layers, for fine-tuning)


def image_size_for(config: BackboneConfig) -> int:
    """The configured input size, or the backbone's default."""
    return config.image_size or REGISTRY[config.name].default_size


def weights_identity(config: BackboneConfig) -> str:
    """What the cached vectors' weights are: a file's sha256, or 'imagenet' / 'none'."""
    if config.weights in ("imagenet", "none"):
        return config.weights
    path = Path(config.weights)
    if not path.is_file():
        raise RunnerError(f"backbone.weights = {config.weights!r}: no such file. Use 'imagenet', 'none', "
                          f"or the path of a Keras weights file (.h5) for backbone {config.name}.")
    return "sha256:" + file_digest(path)


def build_backbone(config: BackboneConfig) -> Backbone:
    """Construct the frozen backbone with its preprocessing folded into the model."""
    spec = REGISTRY[config.name]
    size = image_size_for(config)
    identity = {"backbone": config.name, "weights": weights_identity(config), "image_size": size,
                "alpha": config.alpha if spec.takes_alpha else None}
    weights = None if config.weights == "none" else config.weights
    if weights is None:
        log.warning("backbone.weights = 'none': the backbone is RANDOM. Its features carry no ImageNet "
                    "knowledge and the accuracy of this run means nothing.")
    kwargs = dict(input_shape=(size, size, 3), include_top=False, weights=weights, pooling="avg")
    if spec.takes_alpha:
        kwargs["alpha"] = config.alpha
    try:
        base = spec.constructor(**kwargs)
    except Exception as e:  # h5py reports a damaged file as RuntimeError, KeyError, UnicodeDecodeError ...
        if config.weights in ("imagenet", "none") and not isinstance(e, (ValueError, OSError)):
            raise  # e.g. the ImageNet download failed: not the file's fault
        raise RunnerError(f"could not build backbone {config.name} with backbone.weights = {config.weights!r} "
                          f"(image_size={size}, alpha={config.alpha}): {type(e).__name__}: {str(e).rstrip('.')}. The weights file "
                          f"is damaged or is not Keras weights of this backbone, alpha and include_top=False: "
                          f"download it again, or fix backbone.weights.") from None
    base.trainable = False
    inputs = keras.Input((size, size, 3), dtype="float32")
    features = base(spec.preprocess(inputs), training=False)
    model = keras.Model(inputs, features, name=f"{config.name}_extractor")
    return Backbone(config.name, size, model, int(features.shape[-1]), identity, base)


def decode_and_resize(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes → float32 [size, size, 3] in [0, 255]."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, (size, size), method="bilinear")
    return tf.ensure_shape(image, (size, size, 3))
