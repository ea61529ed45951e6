"""Metrics of the head on a split: loss, accuracy, per-class accuracy, confusion, misclassified."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


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


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def test_report(logits: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str]) -> dict:
    """Accuracy, per-class accuracy, confusion matrix and misclassified images of the test split."""
    loss, accuracy = loss_and_accuracy(logits, labels)
    predictions = np.argmax(logits, axis=1) if len(labels) else np.zeros(0, np.int64)
    confusion = confusion_matrix(labels, predictions, len(classes))
    totals = confusion.sum(axis=1)
    per_class = {name: (float(confusion[i, i] / totals[i]) if totals[i] else None)
                 for i, name in enumerate(classes)}
    probabilities = tf.nn.softmax(logits).numpy() if len(labels) else logits
    misclassified = [{"path": paths[i], "true": classes[labels[i]], "predicted": classes[predictions[i]],
                      "probability": round(float(probabilities[i, predictions[i]]), 4)}
                     for i in np.flatnonzero(predictions != labels)]
    return {"test_loss": loss, "test_accuracy": accuracy, "per_class_accuracy": per_class,
            "confusion_matrix": confusion.tolist(), "misclassified": misclassified}
