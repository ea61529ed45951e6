"""A trained head appended to a converted backbone's TFLite model, as TFLite ops.

The head's standardization is folded into its first dense layer, each dense layer becomes a FULLY_CONNECTED op
(ReLU fused for the hidden layer), then a SOFTMAX; the model's output and its signature move to the new
`probabilities` tensor. Edited through the TFLite flatbuffer schema's object API (TensorFlow's own
flatbuffer_utils), so no second conversion of the backbone is needed.
"""
from __future__ import annotations

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from runner.training.head import Head

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
