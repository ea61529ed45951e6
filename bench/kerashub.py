"""KerasHub backbones on this machine: extraction images/s per family, and the export at DINOv2-base size.

    python bench/kerashub.py [--images 32] [--json]

Each family is a preset of the real architecture (DINOv2 ViT-S/14, DINOv3 ViT-S/16, SigLIP 2 B/16 vision
tower, CLIP ViT-B/16 vision tower, all at 224 px) with RANDOM weights, saved with save_to_preset into a temp
folder: throughput, export time and size do not depend on the weights' values (no download needed). The text
towers of SigLIP and CLIP are made tiny: the runner never runs or exports them.

  extraction  runner.features.extract.extract_missing of --images clothing photos into a fresh cache (decode,
              the preset's resize and rescale, forward, shards written), float32, batch 32; images/s, the
              best of 2 runs after a warm-up
  export      python -m runner.export's export_run of a 6-step run on a DINOv2-base (ViT-B/14) preset:
              SavedModel + TF1 MetaGraph + TFLite + labels; seconds (the TFLite backbone conversion included:
              a fresh cache) and megabytes per format
With --json the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"
REPEATS = 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the DINO presets' converters


def dino_converter(cls, size: int):
    return cls(image_size=(size, size), scale=[1 / (255 * s) for s in STD],
               offset=[-m / s for m, s in zip(MEAN, STD)], interpolation="bicubic")


def save_preset(family: str, folder: Path) -> Path:
    """A random preset of `family` at its published size (see the module docstring)."""
    import keras_hub
    hub = keras_hub.models
    text = dict(vocabulary_size=16, embedding_dim=8, hidden_dim=8, num_layers=1, num_heads=1, intermediate_dim=8,
                max_sequence_length=8)
    if family in ("dinov2_small", "dinov2_base"):
        width = dict(dinov2_small=(384, 6), dinov2_base=(768, 12))[family]
        backbone = hub.DINOV2Backbone(patch_size=14, num_layers=12, hidden_dim=width[0], num_heads=width[1],
                                      intermediate_dim=4 * width[0], image_shape=(224, 224, 3),
                                      position_embedding_shape=(518, 518, 3))
        converter = dino_converter(keras_hub.layers.DINOV2ImageConverter, 224)
    elif family == "dinov3_vit_small":
        backbone = hub.DINOV3Backbone(patch_size=16, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536,
                                      num_register_tokens=4, image_shape=(224, 224, 3))
        converter = dino_converter(keras_hub.layers.DINOV3ImageConverter, 224)
    elif family == "siglip2_base_patch16_224":
        backbone = hub.SigLIPBackbone(hub.SigLIPVisionEncoder(patch_size=16, hidden_dim=768, num_layers=12,
                                                              num_heads=12, intermediate_dim=3072,
                                                              image_shape=(224, 224, 3)),
                                      hub.SigLIPTextEncoder(**text))
        converter = keras_hub.layers.SigLIPImageConverter(image_size=(224, 224), scale=1 / 127.5, offset=-1.0)
    else:
        backbone = hub.CLIPBackbone(hub.CLIPVisionEncoder(patch_size=16, hidden_dim=768, num_layers=12, num_heads=12,
                                                          intermediate_dim=3072, image_shape=(224, 224, 3)),
                                    hub.CLIPTextEncoder(**text), projection_dim=512)
        mean, std = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)  # CLIP's, as its converters fold them
        converter = keras_hub.layers.CLIPImageConverter(
            image_size=(224, 224), scale=[1 / (255 * s) for s in std], offset=[-m / s for m, s in zip(mean, std)],
            interpolation="bicubic")
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


def extraction_rate(preset: Path, paths: list[Path], scratch: Path) -> dict:
    import tensorflow as tf
    from runner.data.scan import ImageRecord
    from runner.features.backbones import build_backbone
    from runner.features.cache import BottleneckCache
    from runner.features.extract import extract_missing, extraction_forward
    from runner.run.config import BackboneConfig
    backbone = build_backbone(BackboneConfig(name=str(preset)))
    strategy = tf.distribute.get_strategy()
    forward = extraction_forward(backbone, strategy, 32)
    records = [ImageRecord(str(p), p.name, 0, "train", f"{i:064x}") for i, p in enumerate(paths)]
    rates = []
    for attempt in range(REPEATS + 1):  # the first run is the warm-up (tracing)
        cache = BottleneckCache(Path(tempfile.mkdtemp(dir=scratch)), backbone.cache_identity, backbone.feature_dim,
                                "float32")
        start = time.perf_counter()
        count = extract_missing(records, backbone, cache, strategy, 32, 512, "lines", forward=forward)
        if attempt:
            rates.append(count / (time.perf_counter() - start))
    return {"images_per_s": round(max(rates), 2), "feature_dim": backbone.feature_dim,
            "params_m": round(backbone.model.count_params() / 1e6, 1)}


def export_cost(preset: Path, scratch: Path) -> dict:
    from runner.export.exporter import export_run
    from runner.job import Job
    from runner.run.config import load_config
    from sync import open_sync
    data = scratch / "data"
    for folder in sorted(p for p in CLOTHING.iterdir() if p.is_dir())[:3]:
        (data / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:6]:
            (data / folder.name / photo.name).symlink_to(photo)
    run_dir = scratch / "run"
    config = load_config(None, [f"data.dir={data}", f"run.dir={run_dir}", f"backbone.name={preset}",
                                "data.min_images_per_class=2", "split.validation_percent=20",
                                "split.test_percent=20", "head.search=off", "train.steps=6", "train.progress=lines",
                                "checkpoint.every_steps=6", "export.enabled=false"])
    Job(config, open_sync(config.sync, config.run_dir, config.cache_dir, run_id="bench")).run()  # sync off
    out = scratch / "export"
    start = time.perf_counter()
    export_run(run_dir, formats="saved_model,meta_graph,tflite,labels", out=out)
    seconds = time.perf_counter() - start
    sizes = {}
    for path in out.rglob("*"):
        if path.is_file():
            kind = "tflite" if path.suffix == ".tflite" else "meta_graph" if path.suffix == ".meta" else "saved_model"
            sizes[kind] = sizes.get(kind, 0) + path.stat().st_size
    return {"export_s": round(seconds, 1), "megabytes": {k: round(v / 2 ** 20, 1) for k, v in sorted(sizes.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="clothing photos per extraction run")
    parser.add_argument("--families", default="dinov2_small,dinov3_vit_small,siglip2_base_patch16_224,"
                                                "clip_vit_base_patch16")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import tensorflow as tf
    paths = sorted(CLOTHING.glob("*/*.jpg"))[:args.images]
    results = {"device": "GPU" if tf.config.list_physical_devices("GPU") else f"CPU ({os.cpu_count()} cores)",
               "extraction": {}}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for family in args.families.split(","):
            preset = save_preset(family, scratch / family)
            results["extraction"][family] = extraction_rate(preset, paths, scratch)
            print(f"{family:28s} {results['extraction'][family]}", flush=True)
        if not args.skip_export:
            preset = save_preset("dinov2_base", scratch / "dinov2_base")
            results["export_dinov2_base"] = export_cost(preset, scratch / "export-run")
            print(f"export at DINOv2-base size: {results['export_dinov2_base']}", flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
