"""The optional fine-tuning stage: unfreeze the top of the backbone, train it with the head on images.

BatchNormalization stays in inference mode (frozen statistics). A KerasHub ViT unfreezes whole transformer
blocks from the top, with the final norm and pooling after them (layer norms have no statistics to freeze).
Batches, augmentation and dropout are pure functions of (seed, step), so fine-tuning resumes exactly like the
head stage.
"""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from runner.features.backbones import Backbone, decode_and_resize
from runner.run.config import FineTuneConfig
from runner.errors import RunnerError
from runner.features.extract import image_pipeline
from runner.training.loop import BatchOrder


def first_unfrozen(names: list[str], config: FineTuneConfig, what: str) -> int:
    """The index of the first of `names` (layers or blocks) to unfreeze: fine_tune.from_layer's, else the top
    fine_tune.fraction; RunnerError when from_layer is not one of them (`what` says what it must be)."""
    if not config.from_layer:
        return int(round(len(names) * (1 - config.fraction)))
    if config.from_layer not in names:
        raise RunnerError(f"fine_tune.from_layer = {config.from_layer!r} is not {what}. Use one of those names, "
                          f"or set fine_tune.fraction instead.")
    return names.index(config.from_layer)


def unfreeze_blocks(backbone: Backbone, config: FineTuneConfig) -> int:
    """A KerasHub ViT: make the top transformer blocks (fine_tune.fraction of them, or from the block named
    fine_tune.from_layer) and the layers after them trainable; return how many layers with weights were."""
    blocks = backbone.blocks
    names = [block.name for block in blocks]
    cut = min(len(blocks) - 1, first_unfrozen(names, config, f"a transformer block of the {backbone.family} "
                                              f"backbone {backbone.name}; its blocks are: {', '.join(names)}"))
    unfrozen = blocks[cut:] + list(backbone.tail)
    inside = {id(sub) for layer in unfrozen for sub in layer._flatten_layers(include_self=True)}
    above = {id(layer) for layer in backbone.model._flatten_layers(include_self=True)
             if any(id(sub) in inside for sub in layer._flatten_layers(include_self=False))}
    backbone.model.trainable = True
    for layer in backbone.model._flatten_layers(include_self=False):
        if id(layer) not in inside and id(layer) not in above:
            layer.trainable = False
    return sum(1 for layer in unfrozen for sub in layer._flatten_layers(include_self=True)
               if sub.trainable and sub._trainable_variables)


def unfreeze_top(backbone: Backbone, config: FineTuneConfig) -> int:
    """Make the top layers trainable (BatchNormalization excepted); return how many layers were unfrozen."""
    if backbone.blocks is not None:
        return unfreeze_blocks(backbone, config)
    layers = backbone.base.layers
    names = [layer.name for layer in layers]
    cut = first_unfrozen(names, config, f"a layer of {backbone.name}; the last layers are: {', '.join(names[-8:])}")
    backbone.base.trainable = True
    unfrozen = 0
    for i, layer in enumerate(layers):
        layer.trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        unfrozen += int(layer.trainable and bool(layer.weights))
    return unfrozen


def _rotate(image: tf.Tensor, radians: tf.Tensor) -> tf.Tensor:
    size = tf.cast(tf.shape(image)[0], tf.float32)
    cos, sin, center = tf.cos(radians), tf.sin(radians), (size - 1) / 2
    # output (x, y) takes input (a0 x + a1 y + a2, b0 x + b1 y + b2): a rotation about the centre
    transform = [cos, -sin, center - center * cos + center * sin,
                 sin, cos, center - center * sin - center * cos, 0.0, 0.0]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.stack(transform)[None], output_shape=tf.shape(image)[:2],
        interpolation="BILINEAR", fill_mode="REFLECT", fill_value=0.0)[0]


def augment(image: tf.Tensor, seed: tf.Tensor, config: FineTuneConfig, size: int) -> tf.Tensor:
    """Flip, crop/scale, brightness and rotation, all stateless in `seed` (shape [2], int64)."""
    seeds = tf.random.experimental.stateless_split(seed, 5)
    if config.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seeds[0])
    if config.crop_scale < 1.0:
        scale = tf.random.stateless_uniform([], seeds[1], config.crop_scale, 1.0)
        side = tf.cast(tf.round(scale * size), tf.int32)
        image = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), seed=seeds[2])
        image = tf.image.resize(image, (size, size))
    if config.brightness > 0:
        image = tf.image.stateless_random_brightness(image, config.brightness * 255.0, seed=seeds[3])
    if config.rotation > 0:
        limit = config.rotation * math.pi / 180
        image = _rotate(image, tf.random.stateless_uniform([], seeds[4], -limit, limit))
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 255.0), (size, size, 3))


class ImageBatches:
    """Augmented training batches of images, step by step from `start`, prefetched by tf.data."""

    def __init__(self, paths: list[str], labels: np.ndarray, order: BatchOrder, size: int, seed: int,
                 config: FineTuneConfig, start: int, stop: int, decode=None):
        self.labels, self.order = labels, order
        decode = decode or (lambda data: decode_and_resize(data, size))
        path_table = tf.constant(paths)
        batch = order.batch_size

        def load(step):
            rows = tf.numpy_function(lambda s: order.indices(int(s)).astype(np.int64), [step], tf.int64)
            rows.set_shape([batch])

            def one(args):
                row, position = args
                image = decode(tf.io.read_file(tf.gather(path_table, row)))
                return augment(image, tf.stack([tf.constant(seed, tf.int64), step * batch + position]),
                               config, size)
            images = tf.map_fn(one, (rows, tf.range(batch, dtype=tf.int64)),
                               fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
            return step, images

        dataset = tf.data.Dataset.range(start, stop).map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                                         deterministic=True)
        self.iterator = iter(dataset.prefetch(2))

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of `step` (steps must be asked for in order)."""
        produced, images = next(self.iterator)
        assert int(produced) == step, (int(produced), step)
        return images.numpy(), self.labels[self.order.indices(step)].astype(np.int32)


class ImageFeatures:
    """Backbone vectors of images (no augmentation) with the backbone's current weights."""

    def __init__(self, backbone: Backbone, batch_size: int):
        self.backbone, self.batch_size = backbone, batch_size
        self.forward = tf.function(lambda x: backbone.model(x, training=False), reduce_retracing=True)

    def __call__(self, paths: list[str]) -> np.ndarray:
        if not paths:
            return np.zeros((0, self.backbone.feature_dim), np.float32)
        batches = image_pipeline(paths, self.backbone.image_size, self.batch_size, self.backbone.decode)
        return np.concatenate([self.forward(images).numpy() for images, _ in batches])
