"""KerasHub image backbones (DINOv2, DINOv3, SigLIP / SigLIP 2, CLIP): preset → frozen feature extractor.

The preprocessing is the preset's own image converter: its resizing layer (size, interpolation, crop to
aspect ratio, antialias) makes the pixels (`decode`), its scale and offset (mean and std folded in) run as
the first op of the model, so the cache, fine-tuning and every export feed the network what KerasHub feeds it.

The feature is the one each family's linear evaluation uses:
- DINOv2 / DINOv3: the class token concatenated with the mean of the patch tokens, both after the final
  layer norm, register tokens left out (DINOv2, arXiv 2304.07193, linear evaluation; the reference
  `create_linear_input` in facebookresearch/dinov2 dinov2/eval/linear.py).
- CLIP: the projected image embedding (`CLIPBackbone.get_vision_embeddings`: class token, post layer norm,
  vision projection; what CLIP's linear probes fit, arXiv 2103.00020 appendix A.2).
- SigLIP / SigLIP 2: the attention-pooled image embedding (`SigLIPBackbone.get_vision_embeddings`).
Only the vision tower is kept in the model: the text tower is dropped after loading and never exported.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common.files import file_digest
from runner.errors import RunnerError
from runner.run.config import BackboneConfig

log = logging.getLogger("runner")

FAMILIES = {  # KerasHub backbone class → (family, feature the runner takes)
    "DINOV2Backbone": ("DINOv2", "class token + mean patch token"),
    "DINOV3Backbone": ("DINOv3", "class token + mean patch token"),
    "SigLIPBackbone": ("SigLIP", "pooled image embedding"),
    "CLIPBackbone": ("CLIP", "projected image embedding"),
}
SUPPORTED = "DINOv2, DINOv3, SigLIP / SigLIP 2 and CLIP"
NOT_HASHED = ("metadata.json", "README.md")  # save dates and model cards: not what the vectors depend on


def _preset_utils():
    try:
        from keras_hub.src.utils import preset_utils
    except ImportError:
        raise RunnerError("backbone.name names a KerasHub preset but keras_hub is not installed: "
                          "pip install -r requirements.txt (keras-hub), or pick a keras.applications "
                          "backbone (docs/backbones.md).") from None
    return preset_utils


def _fetch(config: BackboneConfig, file: str) -> Path:
    """A file of the preset, local (a preset directory) or fetched by KerasHub into its cache."""
    preset_utils = _preset_utils()
    try:
        return Path(preset_utils.get_file(config.name, file))
    except Exception as e:  # KerasHub raises ValueError, FileNotFoundError, or its download errors
        raise RunnerError(f"backbone.name = {config.name!r} is not a keras.applications backbone and KerasHub "
                          f"could not open it as a preset ({type(e).__name__}: {str(e)[:300]}). Use a "
                          f"keras.applications name, a KerasHub preset name (e.g. dinov2_small), a kaggle:// or "
                          f"hf:// handle, or the path of a preset directory saved by save_to_preset.") from None


def preset_class(config: BackboneConfig) -> str:
    """The KerasHub backbone class the preset's config.json names; refuse one of another family."""
    import json
    meta = json.loads(_fetch(config, "config.json").read_text(encoding="utf-8"))
    name = meta.get("class_name", "?")
    if name not in FAMILIES:
        raise RunnerError(f"backbone.name = {config.name!r} is a KerasHub {name} preset; this runner extracts "
                          f"features from {SUPPORTED} image presets only. Pick one of those (docs/backbones.md).")
    return name


def family(config: BackboneConfig) -> str:
    return FAMILIES[preset_class(config)][0]


def weights_identity(config: BackboneConfig) -> str:
    """sha256 over the preset's files (config, image converter, weights), or of its configs alone for
    backbone.weights = 'none' (random weights)."""
    if config.weights not in ("imagenet", "none"):
        raise RunnerError(f"backbone.weights = {config.weights!r} with the {family(config)} preset "
                          f"{config.name!r}: a KerasHub preset carries its own weights. Leave backbone.weights "
                          f"at 'imagenet' (the preset's weights) or 'none' (random), or point backbone.name at "
                          f"a preset directory holding the weights you want.")
    folder = _fetch(config, "config.json").parent
    _fetch(config, "image_converter.json")
    if config.weights != "none":
        weights = "model.weights.json" if (folder / "model.weights.json").is_file() else "model.weights.h5"
        _fetch(config, weights)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in NOT_HASHED):
        if config.weights == "none" and not path.name.endswith(".json"):
            continue
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode("utf-8"))
    return ("random-sha256:" if config.weights == "none" else "sha256:") + digest.hexdigest()


def load_converter(config: BackboneConfig):
    """The preset's ImageConverter, resized to backbone.image_size when one is set."""
    import keras_hub
    converter = keras_hub.layers.ImageConverter.from_preset(config.name)
    if converter.image_size is None:
        raise RunnerError(f"the image converter of {config.name!r} has no image size; set backbone.image_size.")
    if config.image_size:
        if preset_class(config) not in ("DINOV2Backbone", "DINOV3Backbone") and \
                tuple(converter.image_size) != (config.image_size, config.image_size):
            raise RunnerError(f"backbone.image_size = {config.image_size} with the {family(config)} preset "
                              f"{config.name!r}, made for {converter.image_size[0]}: its position embeddings are "
                              f"fixed. Set backbone.image_size = 0 (the preset's size).")
        converter.image_size = (config.image_size, config.image_size)
    return converter


def image_size_for(config: BackboneConfig) -> int:
    return config.image_size or int(load_converter(config).image_size[0])


@dataclass
class Network:
    """A KerasHub vision network, preprocessing folded in: float images [0, 255] → feature vectors."""
    model: keras.Model       # (None, S, S, 3) float32 [0, 255] → (None, D) float32
    base: keras.Model        # the KerasHub backbone (DINO) or vision encoder (CLIP, SigLIP) inside `model`
    blocks: list             # its transformer blocks, in order (fine-tuning unfreezes the last ones)
    tail: list               # the layers after the blocks (final norm, pooling, projection)
    converter: object        # the preset's ImageConverter


def _rescale(converter, x):
    """The converter's scale and offset (per channel or global), computed in float32."""
    if converter.scale is not None:
        x = x * np.asarray(converter.scale, np.float32)
    if converter.offset is not None:
        x = x + np.asarray(converter.offset, np.float32)
    return x


def _after(model: keras.Model, block) -> list:
    """The top-level layers of `model` after the one holding `block` (final norm, pooling head)."""
    layers = model.layers
    holder = next(i for i, layer in enumerate(layers) if block in layer._flatten_layers(include_self=True))
    return [layer for layer in layers[holder + 1:] if layer.weights]


def _with_dtype(config, dtype: str):
    """A serialized Keras config with every layer's dtype set to the policy `dtype`."""
    if isinstance(config, dict):
        return {key: dtype if key == "dtype" else _with_dtype(value, dtype) for key, value in config.items()}
    if isinstance(config, list):
        return [_with_dtype(value, dtype) for value in config]
    return config


def build_network(config: BackboneConfig, dtype: str | None = None, load_weights: bool = True) -> Network:
    """Load the preset (weights unless backbone.weights = 'none' or `load_weights` is False) and wrap its
    vision part; `dtype` is a Keras dtype policy name (e.g. 'mixed_float16'), given only with load_weights
    False (the caller copies the float32 weights in)."""
    import keras_hub
    class_name = preset_class(config)
    converter = load_converter(config)
    size = int(converter.image_size[0])
    kwargs = {}
    if class_name in ("DINOV2Backbone", "DINOV3Backbone") and config.image_size:
        kwargs["image_shape"] = (size, size, 3)
    hub = keras_hub.models.Backbone.from_preset(config.name, load_weights=load_weights and config.weights != "none",
                                                **kwargs)
    if dtype:  # from_preset(dtype=) leaves the towers of CLIP and SigLIP at the dtype saved in their configs
        hub = type(hub).from_config(_with_dtype(hub.get_config(), dtype))
    inputs = keras.Input((size, size, 3), dtype="float32", name="pixels")
    x = _rescale(converter, inputs)
    if class_name in ("DINOV2Backbone", "DINOV3Backbone"):
        base = hub
        (key,) = hub.input.keys()
        tokens = hub({key: x})
        patches = tokens[:, 1 + hub.num_register_tokens:]
        features = keras.ops.concatenate([tokens[:, 0], keras.ops.mean(patches, axis=1)], axis=-1)
        blocks = list(hub.encoder.layers)
        tail = _after(hub, blocks[-1])
    else:
        base = hub.vision_encoder
        blocks = list(base.encoder_layers)
        features = hub.get_vision_embeddings(x)
        tail = _after(base, blocks[-1])
        if class_name == "CLIPBackbone":  # its pooling and projection belong to the CLIPBackbone, not the tower
            tail += [hub.vision_pooler, hub.vision_projection]
    if features.dtype != "float32":  # a mixed-precision network computes in float16 / bfloat16
        features = keras.ops.cast(features, "float32")
    model = keras.Model(inputs, features, name=f"{FAMILIES[class_name][0].lower()}_extractor")
    return Network(model, base, blocks, tail, converter)


def resize(converter, image: tf.Tensor) -> tf.Tensor:
    """A decoded uint8 [h, w, 3] image → float32 [S, S, 3] in [0, 255] by the converter's resizing layer, which
    keeps uint8 as KerasHub's converter does given a decoded image (a bicubic overshoot is clipped)."""
    height, width = converter.image_size
    pixels = converter.resizing(image)
    return tf.ensure_shape(tf.cast(pixels, tf.float32), (height, width, 3))


def mixed_policy() -> str:
    """bfloat16 on GPUs that compute in it natively (compute capability 8.0 and up), float16 on older ones."""
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if tuple(capability) < (8, 0):
            return "mixed_float16"
    return "mixed_bfloat16"
