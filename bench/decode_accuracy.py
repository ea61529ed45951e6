"""Does decoding JPEGs at their DCT ratio cost accuracy? The clothing photos upscaled to 2,400 x 1,800,
features extracted with the runner's decode (DCT ratio 8 here) and with the naive full-size decode +
resize, a logistic regression fitted on each train split; plus the original photos as the reference.

    python bench/decode_accuracy.py [--images 0]

The split is the runner's (retrain.py's stable hash, 10 % validation, 10 % test).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from extraction import write_large  # noqa: E402
from runner.features.backbones import build_backbone, decode_and_resize  # noqa: E402
from runner.run.config import BackboneConfig  # noqa: E402
from runner.data.scan import split_of  # noqa: E402

SHARED = REPO.parent / "shared"


def naive_decode(image_bytes, size: int):
    """What the runner did before: the general decoder at full size, then resize."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.ensure_shape(tf.image.resize(image, (size, size)), (size, size, 3))


def features(paths: list[str], backbone, decode) -> np.ndarray:
    size = backbone.image_size
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: decode(tf.io.read_file(p), size),
                                                            num_parallel_calls=tf.data.AUTOTUNE)
    forward = tf.function(lambda x: backbone.model(x, training=False), reduce_retracing=True)
    return np.concatenate([forward(batch).numpy() for batch in dataset.batch(32).prefetch(2)])


def accuracies(vectors: np.ndarray, labels: np.ndarray, splits: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(max_iter=5000).fit(vectors[splits == "train"], labels[splits == "train"])
    return {name: model.score(vectors[splits == name], labels[splits == name]) for name in ("validation", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="photos to use (0 = all 1,885)")
    parser.add_argument("--data", default=str(SHARED / "datasets" / "clothing-small"))
    args = parser.parse_args()
    data = Path(args.data)
    small = sorted(str(p) for p in data.rglob("*.jpg"))
    small = small[:: max(1, len(small) // args.images)][: args.images] if args.images else small
    relpaths = [Path(p).relative_to(data).as_posix() for p in small]
    classes = sorted({r.split("/")[0] for r in relpaths})
    labels = np.array([classes.index(r.split("/")[0]) for r in relpaths])
    splits = np.array([split_of(r, 10, 10) for r in relpaths])
    backbone = build_backbone(BackboneConfig(name="mobilenet", alpha=0.25,
                                             weights=str(SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5")))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        large = write_large(small, Path(tmp))
        print(f"re-encoded {len(large)} photos at 2400x1800 in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        results = {"original photos (about 400 x 534)": accuracies(features(small, backbone, decode_and_resize),
                                                                  labels, splits)}
        for name, decode in (("2400x1800, naive decode + resize", naive_decode),
                             ("2400x1800, runner's DCT-ratio decode", decode_and_resize)):
            start = time.perf_counter()
            vectors = features(large, backbone, decode)
            seconds = time.perf_counter() - start
            results[name] = dict(accuracies(vectors, labels, splits), seconds=seconds)
    print(f"\nlogistic regression on MobileNet v1 0.25 features, {len(small)} photos "
          f"({(splits == 'train').sum()} train / {(splits == 'validation').sum()} validation / "
          f"{(splits == 'test').sum()} test)")
    for name, result in results.items():
        extra = f"  (features in {result['seconds']:.0f} s)" if "seconds" in result else ""
        print(f"  {name:40s} test {100 * result['test']:5.1f} %  validation {100 * result['validation']:5.1f} %{extra}")


if __name__ == "__main__":
    main()
