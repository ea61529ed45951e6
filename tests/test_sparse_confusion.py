"""test_report.json at thousands of classes: the confusion matrix is stored as its non-zero cells."""
from __future__ import annotations

import json

import numpy as np


def fake_predictions(num_classes: int, per_class: int, error_rate: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    predictions = labels.copy()
    wrong = rng.random(len(labels)) < error_rate
    predictions[wrong] = rng.integers(0, num_classes, wrong.sum())
    logits = np.full((len(labels), num_classes), -5.0, np.float32)
    logits[np.arange(len(labels)), predictions] = 5.0
    return logits, labels


def test_the_report_of_4000_classes_is_small_sparse_and_exact(tmp_path):
    from runner.run.records import TestReport
    from runner.run.rundir import readable_json
    from runner.training.evaluate import test_report
    from runner.ui.report import confusion_entries, dense_confusion
    num_classes = 4000
    logits, labels = fake_predictions(num_classes, 2, 0.3)
    classes = [f"class_{i}" for i in range(num_classes)]
    report = test_report(logits, labels, classes, [f"{classes[k]}/{i}.jpg" for i, k in enumerate(labels)])
    text = readable_json(report.to_json())
    assert len(text) < 2_000_000, "a dense 4000 x 4000 matrix would be 32+ MB"
    read = TestReport.from_json(json.loads(text))
    assert read == report
    entries = confusion_entries(read, num_classes)
    expected = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(expected, (labels, np.argmax(logits, 1)), 1)
    np.testing.assert_array_equal(dense_confusion(entries, num_classes), expected)
    assert len(entries) == np.count_nonzero(expected)
    assert report.per_class_accuracy["class_7"] == expected[7, 7] / expected[7].sum()


def test_the_report_file_stays_readable_one_cell_and_one_mistake_per_line():
    from runner.run.rundir import readable_json
    from runner.training.evaluate import test_report
    logits, labels = fake_predictions(5, 10, 0.4)
    report = test_report(logits, labels, list("abcde"), [f"x/{i}.jpg" for i in range(50)])
    lines = readable_json(report.to_json()).splitlines()
    cells = report.confusion_matrix["entries"]
    assert sum(line.strip().rstrip(",") in {json.dumps(c) for c in cells} for line in lines) == len(cells)
    assert sum('"path": ' in line for line in lines) == len(report.misclassified)
    assert any(line.startswith(' "test_accuracy": ') for line in lines)


def test_a_dense_matrix_of_an_older_run_is_still_read_and_top_confusions_match(tmp_path):
    from runner.run.records import TestReport
    from runner.ui.report import confusion_entries, top_confusions
    dense = np.array([[5, 2, 0], [0, 4, 3], [1, 0, 6]])
    sparse = {"confusion_matrix": {"format": "sparse", "num_classes": 3,
                                   "entries": [[i, j, int(dense[i, j])] for i, j in zip(*np.nonzero(dense))]}}
    old = {"confusion_matrix": dense.tolist()}
    for report in (sparse, old):
        lines = top_confusions(confusion_entries(TestReport.from_json(report), 3), ["a", "b", "c"])
        assert [line.split()[0] for line in lines] == ["3", "2", "1"]
        assert "b → c" in lines[0] and "(43% of b)" in lines[0]


def test_the_notebook_per_class_table_reads_the_sparse_matrix():
    from runner.run.records import TestReport
    from runner.ui.notebook import per_class_table
    report = TestReport(confusion_matrix={"format": "sparse", "num_classes": 3,
                                          "entries": [[0, 0, 3], [0, 1, 1], [1, 1, 2], [2, 0, 2], [2, 2, 2]]})
    lines = per_class_table(report, ["hat", "pants", "shoes"])
    assert [line.split()[:3] for line in lines[1:]] == [["shoes", "4", "2"], ["hat", "4", "3"], ["pants", "2", "2"]]
