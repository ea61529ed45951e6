"""The TFLite export: the backbone converted once per backbone and weights, the trained head appended as ops.

Converting a backbone is most of an export's time (Inception V3: about 40 s of MLIR passes on a CPU), yet it
only depends on the backbone and its weights, never on the head. So the converted backbone (features out) is
kept in CACHE_DIR/tflite/, named by the backbone's cache identity, and each export appends its head to it:
the head's standardization folded into its first dense layer, FULLY_CONNECTED ops (ReLU fused for the hidden
layer), then SOFTMAX, and the model's output and signature moved to the new `probabilities` tensor. A
fine-tuned checkpoint carries its own backbone weights, so its whole model is converted as before.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from common.files import write_bytes_atomic, write_text_atomic
from runner.backbones import Backbone
from runner.head import Head

log = logging.getLogger("runner")

TFLITE_DIR = "tflite"  # inside the bottleneck cache folder
TFLITE_FLOAT = "model.tflite"
TFLITE_QUANTIZED = "model_quantized.tflite"
# (export format, model.json key, file, converter optimizations)
TFLITE_VARIANTS = (("tflite", "float", TFLITE_FLOAT, []),
                   ("tflite_quantized", "quantized", TFLITE_QUANTIZED, [tf.lite.Optimize.DEFAULT]))
OUTPUT_NAME = "probabilities"


def folded_dense_layers(head: Head) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """The head as (kernel [in, out], bias, relu) dense layers, its standardization (x - mean) / std folded
    into the first: x' W + b = x (W / std[:, None]) + (b - (mean / std) W)."""
    mean, std = head.feature_mean.numpy().astype(np.float64), head.feature_std.numpy().astype(np.float64)
    dense = [(head.hidden, True)] if head.hidden is not None else []
    layers = []
    for layer, relu in dense + [(head.logits, False)]:
        kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
        if not layers:
            kernel, bias = kernel / std[:, None], bias - (mean / std) @ kernel
        layers.append((kernel.astype(np.float32), bias.astype(np.float32), relu))
    return layers


def _opcode_index(model, builtin: int) -> int:
    """The index of `builtin`'s operator code in `model`, added (version 1) when the model has none."""
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _tensor(model, graph, name: str, shape: tuple[int, ...], data: np.ndarray | None = None) -> int:
    """Add a float32 tensor (a constant when `data` is given) to `graph`; its index."""
    buffer = schema.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(np.ascontiguousarray(data, np.float32).tobytes(), np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.name, tensor.type, tensor.buffer = name.encode(), schema.TensorType.FLOAT32, len(model.buffers) - 1
    tensor.shape = np.array(shape, np.int32)
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _operator(model, graph, builtin: int, inputs: list[int], outputs: list[int], options_type: int, options):
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(model, builtin)
    op.inputs, op.outputs = np.array(inputs, np.int32), np.array(outputs, np.int32)
    op.builtinOptionsType, op.builtinOptions = options_type, options
    graph.operators.append(op)


def append_head(backbone_tflite: bytes, head: Head) -> bytes:
    """A TFLite model of the backbone's (one input, one [1, D] features output) with `head` and a softmax after
    it: output `probabilities` [1, num_classes]."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(backbone_tflite))
    graph = model.subgraphs[0]
    x = int(graph.outputs[0])
    for number, (kernel, bias, relu) in enumerate(folded_dense_layers(head)):
        weights = _tensor(model, graph, f"head/dense_{number}/kernel", kernel.T.shape, kernel.T)
        offset = _tensor(model, graph, f"head/dense_{number}/bias", bias.shape, bias)
        out = _tensor(model, graph, f"head/dense_{number}", (1, kernel.shape[1]))
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = (schema.ActivationFunctionType.RELU if relu
                                           else schema.ActivationFunctionType.NONE)
        _operator(model, graph, schema.BuiltinOperator.FULLY_CONNECTED, [x, weights, offset], [out],
                  schema.BuiltinOptions.FullyConnectedOptions, options)
        x = out
    probabilities = _tensor(model, graph, OUTPUT_NAME, (1, head.num_classes))
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    _operator(model, graph, schema.BuiltinOperator.SOFTMAX, [x], [probabilities],
              schema.BuiltinOptions.SoftmaxOptions, softmax)
    graph.outputs = np.array([probabilities], np.int32)
    for signature in model.signatureDefs or []:
        output = schema.TensorMapT()
        output.name, output.tensorIndex = OUTPUT_NAME.encode(), probabilities
        signature.outputs = [output]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def convert(function, trackable, optimizations: list) -> bytes:
    """TFLite bytes of a concrete function, frozen first (converting the live function loses the Keras 3
    variables: the model outputs NaN)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(function)],
                                                                trackable)
    converter.optimizations = optimizations
    return converter.convert()


def pixels_spec(size: int) -> tf.TensorSpec:
    """The TFLite input: one decoded, resized image, float32 0..255."""
    return tf.TensorSpec([1, size, size, 3], tf.float32, name="pixels")


def backbone_key(identity: dict, variant: str) -> str:
    """The cache file name of a converted backbone: its cache identity, the TFLite variant, TF's version."""
    text = json.dumps({"backbone": identity, "variant": variant, "tensorflow": tf.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def converted_backbone(backbone: Backbone, identity: dict, variant: str, optimizations: list,
                       cache_dir: Path | None) -> bytes:
    """The backbone alone (pixels → features) as TFLite, from CACHE_DIR/tflite when an earlier export converted
    it (and its sha256 still matches), else converted now and kept there."""
    path = cache_dir / TFLITE_DIR / f"{backbone_key(identity, variant)}.tflite" if cache_dir else None
    digest_path = path.with_suffix(".sha256") if path is not None else None
    if path is not None and path.is_file() and digest_path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == digest_path.read_text().strip():
            log.info("TFLite: reusing the converted %s backbone (%s)", identity["backbone"], path)
            return data
        log.warning("TFLite: %s is damaged (its sha256 differs from %s); converting the backbone again",
                    path, digest_path.name)
    features = tf.function(lambda pixels: backbone.model(pixels, training=False))
    data = convert(features.get_concrete_function(pixels_spec(backbone.image_size)), backbone.model, optimizations)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        write_text_atomic(digest_path, hashlib.sha256(data).hexdigest() + "\n")  # last: it vouches for the file
    return data
