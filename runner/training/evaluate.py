"""Metrics of the head on a split: loss, accuracy, per-class accuracy, confusion, misclassified."""
from __future__ import annotations


import numpy as np
import tensorflow as tf

from runner.run.records import TestReport


def predict_logits(head, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Head logits for a float32 feature array, in batches."""
    if len(features) == 0:
        return np.zeros((0, head.num_classes), np.float32)
    parts = [head(features[i:i + batch_size], training=False).numpy()
             for i in range(0, len(features), batch_size)]
    return np.concatenate(parts)


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """Mean cross-entropy and accuracy; (None, None) for an empty split."""
    if len(labels) == 0:
        return None, None
    losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return float(np.mean(losses)), float(np.mean(np.argmax(logits, axis=1) == labels))


def sparse_confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """The confusion matrix as its non-zero cells: {"format": "sparse", "num_classes": n,
    "entries": [[true, predicted, count], ...]} sorted by (true, predicted); never n x n in memory."""
    cells, counts = np.unique(np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64),
                              return_counts=True)
    entries = [[int(c // num_classes), int(c % num_classes), int(n)] for c, n in zip(cells, counts)]
    return {"format": "sparse", "num_classes": num_classes, "entries": entries}


def test_report(logits: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str]) -> TestReport:
    """Accuracy, per-class accuracy, sparse confusion matrix and misclassified images of the test split."""
    loss, accuracy = loss_and_accuracy(logits, labels)
    predictions = np.argmax(logits, axis=1) if len(labels) else np.zeros(0, np.int64)
    totals = np.bincount(labels, minlength=len(classes))
    correct = np.bincount(labels[predictions == labels], minlength=len(classes))
    per_class = {name: (float(correct[i] / totals[i]) if totals[i] else None)
                 for i, name in enumerate(classes)}
    probabilities = tf.nn.softmax(logits).numpy() if len(labels) else logits
    misclassified = [{"path": paths[i], "true": classes[labels[i]], "predicted": classes[predictions[i]],
                      "probability": round(float(probabilities[i, predictions[i]]), 4)}
                     for i in np.flatnonzero(predictions != labels)]
    return TestReport(loss, accuracy, per_class, sparse_confusion(labels, predictions, len(classes)),
                      tuple(misclassified))
