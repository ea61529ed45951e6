"""Load a TFLite model with LiteRT (`ai_edge_litert`) where it is installed, else TensorFlow's deprecated
`tf.lite.Interpreter` (scheduled for deletion: LiteRT replaces it)."""
from __future__ import annotations

from pathlib import Path


def tflite_interpreter(model_path: str | Path):
    """An allocated interpreter of a .tflite file: ai_edge_litert's Interpreter, or tf.lite's without it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(model_path))
    interpreter.allocate_tensors()
    return interpreter
