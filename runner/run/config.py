"""The typed run configuration: TOML file + `--set section.key=value` overrides, validated once.

This module does not import TensorFlow, so `resume.py --help` and `--print-config` stay fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from common import settings
from common.settings import DEFAULT_CACHE_SUBDIR, DEFAULT_RUN_DIR
from common.settings import setting as _opt
from runner.errors import RunnerError
from sync.config import SyncConfig


@dataclass
class DataConfig:
    dir: str = _opt("", "folder with one sub-folder of images per class; or a .zip/.tar/.tar.gz/.tgz of one (a "
                        "path, or an http(s):// URL), unpacked once into data.unpack_dir; or tfds:NAME (TensorFlow "
                        "Datasets) or hf:PATH[:CONFIG] (Hugging Face datasets), docs/data.md",
                    path=lambda section: not section.dir.startswith(("https://", "http://", "tfds:", "hf:")))
    unpack_dir: str = _opt("~/.cache/bottleneck-runner/data", "local folder where an archive data.dir is "
                           "unpacked, and a data.dir under data.copy_prefix copied, once (reused by reruns)",
                           path=True)
    copy_prefix: str = _opt("/content/drive", "a data.dir folder under this mount (Google Drive's on Colab) is "
                            "copied to data.unpack_dir before the scan, then kept up to date; '' = never copy",
                            path=True)
    min_images_per_class: int = _opt(5, "a class with fewer valid images stops the run early", min=1)
    image_key: str = _opt("", "tfds: / hf: data.dir: the image feature or column; '' = found from the dataset")
    label_key: str = _opt("", "tfds: / hf: data.dir: the ClassLabel feature or column; '' = found from the dataset")
    layout: str = _opt("auto", "how data.dir is organised: classes (DATA/<class>/), splits (DATA/<split>/<class>/, "
                               "the dataset's own train/validation/test), or auto (splits when every top-level "
                               "folder is a split name); docs/data.md", choices=("auto", "classes", "splits"))
    labels: str = _opt("", "a CSV file naming each image's class (relative to data.dir, or absolute); '' = the "
                           "folders name the classes; docs/data.md")
    labels_columns: str = _opt("", "data.labels' image and label columns (and optionally a split column), e.g. "
                                   "'id,breed'; '' = found from the header")


@dataclass
class RunConfig:
    dir: str = _opt(DEFAULT_RUN_DIR, "run directory: checkpoints, cache, metrics, summary", path=True)


@dataclass
class SplitConfig:
    validation_percent: float = _opt(10.0, "share of images for validation (stable hash split)", min=0, max=90)
    test_percent: float = _opt(10.0, "share of images for the final test (stable hash split)", min=0, max=90)


BACKBONE_NAMES = ("inception_v3", "mobilenet_v2", "mobilenet", "efficientnet_b0", "resnet50", "resnet50_v2",
                  "efficientnet_v2_b0", "efficientnet_v2_b1", "efficientnet_v2_b2", "efficientnet_v2_b3",
                  "efficientnet_v2_s", "convnext_tiny", "convnext_small")
KERASHUB_EXAMPLES = ("dinov2_small", "dinov2_base", "dinov3_vit_small_lvd1689m", "dinov3_vit_base_lvd1689m",
                     "siglip2_base_patch16_224", "clip_vit_base_patch16")  # KerasHub presets docs/backbones.md compares
KERASHUB_HANDLES = ("kaggle://", "hf://", "gs://", "modelscope://")
KERASHUB_FAMILY_PREFIXES = ("dinov2_", "dinov3_", "siglip", "clip_")  # KerasHub's preset names of those families


def is_preset_dir(name: str) -> bool:
    """Whether backbone.name is read as the path of a local KerasHub preset directory (it has a path separator
    or starts with '.' or '~', and is no keras.applications name nor KerasHub handle)."""
    return (name not in BACKBONE_NAMES and not name.startswith(KERASHUB_HANDLES)
            and ("/" in name or name.startswith((".", "~"))))


@dataclass
class BackboneConfig:
    name: str = _opt("mobilenet_v2", "frozen backbone that makes the bottlenecks: a keras.applications name ("
                                    + ", ".join(BACKBONE_NAMES) + "), or a KerasHub DINOv2 / DINOv3 / SigLIP / "
                                    "CLIP image preset: its name (e.g. " + ", ".join(KERASHUB_EXAMPLES) + "), a "
                                    "kaggle:// or hf:// handle, or a local preset directory; docs/backbones.md "
                                    "compares them", path=lambda section: is_preset_dir(section.name))
    weights: str = _opt("imagenet", "'imagenet' (downloaded; for a KerasHub preset: the preset's own weights), a "
                                    "local Keras weights file path (.h5, .weights.h5, .keras), or 'none' (random)",
                        path=lambda section: section.weights not in ("imagenet", "none"))
    image_size: int = _opt(0, "input size in pixels; 0 = the backbone's default", min=0, max=1024)
    alpha: float = _opt(1.0, "width multiplier of MobileNet / MobileNetV2", min=0.1, max=2.0)
    allow_random_weights: bool = _opt(False, "must be true to accept weights='none' (accuracy is meaningless)")
    mixed_precision: bool = _opt(False, "extract bottlenecks computing in float16 (for GPUs; vectors are stored "
                                        "as cache.dtype either way; slower on a CPU)")
    xla: bool = _opt(False, "compile the extraction forward pass with XLA (for GPUs; much slower on a CPU)")


@dataclass
class CacheConfig:
    dir: str = _opt("", "bottleneck cache folder; '' = RUN_DIR/cache (share it between runs to reuse vectors)",
                    path=True)
    dtype: str = _opt("float16", "storage type of cached vectors", choices=("float16", "float32"))
    shard_size: int = _opt(512, "vectors per cache shard (a kill loses at most one shard)", min=1)
    batch_size: int = _opt(32, "images per forward pass during extraction; 0 = chosen for the device (32 on a "
                               "CPU, 128 on a GPU)", min=0)


@dataclass
class HeadConfig:
    hidden_units: int = _opt(0, "units of an optional ReLU hidden layer; 0 = plain softmax", min=0)
    dropout: float = _opt(0.0, "dropout rate before the logits layer", min=0.0, max=0.95)
    search: str = _opt("auto", "auto: train a grid of learning rates x weight decays at once and keep the best "
                               "validation step of the best; off: train exactly the configured head",
                       choices=("auto", "off"))
    weight_decay: float = _opt(0.0, "L2 penalty on the kernels with head.search = off (the search sets its own)",
                               min=0.0)


@dataclass
class TrainConfig:
    steps: int = _opt(0, "head training steps; 0 = train.epochs passes over the training split", min=0)
    epochs: float = _opt(100.0, "head training budget in passes over the training split (with train.steps = 0)",
                         min=0.01)
    patience: int = _opt(10, "head search: a candidate stops after this many evaluations (one per epoch) "
                             "without a lower validation loss", min=1)
    batch_size: int = _opt(100, "vectors per training step", min=1)
    learning_rate: float = _opt(0.001, "the head's RMSProp learning rate with head.search = off (the search uses "
                                       "its own grid; fine-tuning has the fine_tune section)", min=0.0)
    rho: float = _opt(0.9, "the head's RMSProp discounting factor", min=0.0, max=1.0)
    momentum: float = _opt(0.0, "the head's RMSProp momentum", min=0.0, max=1.0)
    epsilon: float = _opt(1e-7, "the head's RMSProp epsilon", min=0.0)
    decay_rate: float = _opt(1.0, "the head's exponential learning-rate decay per decay_steps (head.search = off); "
                                  "1.0 = none", min=0.0, max=1.0)
    decay_steps: int = _opt(1000, "head steps per learning-rate decay", min=1)
    label_smoothing: float = _opt(0.0, "label smoothing of the head's cross-entropy", min=0.0, max=0.5)
    class_weights: str = _opt("none", "'balanced' weighs classes by inverse frequency", choices=("none", "balanced"))
    seed: int = _opt(0, "seed of data order, dropout and initialisation", min=0)
    strategy: str = _opt("default", "tf.distribute strategy", choices=("default", "mirrored"))
    cpu_devices: int = _opt(0, "split the CPU into N logical devices (to try 'mirrored' without GPUs); 0 = no split",
                            min=0, max=16)
    deterministic: bool = _opt(False, "deterministic TensorFlow ops (bit-exact resume of fine-tuning; slower "
                                      "on GPU)")
    progress: str = _opt("auto", "progress display: tqdm bars, plain lines, or auto (bars on a terminal)",
                         choices=("auto", "bar", "lines"))


@dataclass
class EvalConfig:
    every_steps: int = _opt(100, "validate the head every N steps with head.search = off (the search validates "
                                 "once per epoch; fine-tuning: fine_tune.eval_every_steps)", min=1)


@dataclass
class CheckpointConfig:
    every_steps: int = _opt(200, "checkpoint every N steps; 0 = only by time", min=0)
    every_seconds: float = _opt(120.0, "checkpoint at least every T seconds; 0 = only by steps", min=0.0)
    max_to_keep: int = _opt(3, "local checkpoints kept", min=1)


@dataclass
class FineTuneConfig:
    enabled: bool = _opt(False, "after the head, unfreeze the top of the backbone and train end to end on images")
    steps: int = _opt(500, "fine-tuning steps", min=0)
    from_layer: str = _opt("", "name of the first backbone layer to unfreeze; '' = use fraction")
    fraction: float = _opt(0.2, "share of the backbone's layers (from the top) to unfreeze", min=0.0, max=1.0)
    learning_rate: float = _opt(3e-5, "RMSProp learning rate of backbone and head; 0 = a tenth of the head "
                                      "stage's (the search's choice)", min=0.0)
    rho: float = _opt(0.9, "RMSProp discounting factor of fine-tuning", min=0.0, max=1.0)
    momentum: float = _opt(0.0, "RMSProp momentum of fine-tuning", min=0.0, max=1.0)
    epsilon: float = _opt(1e-7, "RMSProp epsilon of fine-tuning", min=0.0)
    decay_rate: float = _opt(1.0, "fine-tuning's exponential learning-rate decay per decay_steps; 1.0 = none",
                             min=0.0, max=1.0)
    decay_steps: int = _opt(1000, "fine-tuning steps per learning-rate decay", min=1)
    label_smoothing: float = _opt(0.0, "label smoothing of fine-tuning's cross-entropy", min=0.0, max=0.5)
    eval_every_steps: int = _opt(100, "validate fine-tuning every N of its steps", min=1)
    batch_size: int = _opt(32, "images per fine-tuning step", min=1)
    flip: bool = _opt(True, "augment: random horizontal flip")
    crop_scale: float = _opt(0.8, "augment: random crop keeping at least this share of the side; 1 = off",
                             min=0.3, max=1.0)
    brightness: float = _opt(0.1, "augment: random brightness change up to this share of full scale; 0 = off",
                             min=0.0, max=0.5)
    rotation: float = _opt(5.0, "augment: random rotation up to this many degrees; 0 = off", min=0.0, max=45.0)


EXPORT_FORMATS = {  # name → what it writes into RUN_DIR/export (model.json is always written)
    "saved_model": "saved_model.pb + variables/ (TF2; what runner.export.classify loads)",
    "meta_graph": "variables/variables.meta (TF1 MetaGraph restored from the SavedModel's variables/; needs "
                  "saved_model)",
    "tflite": "model.tflite (float)",
    "tflite_quantized": "model_quantized.tflite (dynamic-range quantized)",
    "tf1": "frozen_graph.pb + model.meta (TF1 sessions)",
    "labels": "labels.txt",
}


@dataclass
class ExportConfig:
    enabled: bool = _opt(True, "write RUN_DIR/export at the end of training")
    min_accuracy: float = _opt(0.0, "refuse to export below this test accuracy (0-1)", min=0.0, max=1.0)
    top_k: int = _opt(5, "classes returned per image by the exported model", min=1)
    formats: str = _opt("saved_model,meta_graph,tflite,labels", "comma-separated formats to write, from: "
                        + ", ".join(EXPORT_FORMATS) + " (each full-size format is one more copy of the backbone)")

    def format_names(self) -> tuple[str, ...]:
        """The formats asked for by export.formats, each a key of EXPORT_FORMATS."""
        names = tuple(dict.fromkeys(n.strip() for n in self.formats.split(",") if n.strip()))
        unknown = [n for n in names if n not in EXPORT_FORMATS]
        if unknown or not names:
            raise RunnerError(f"setting export.formats = {self.formats!r}: "
                              f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; use a "
                              f"comma-separated list of {', '.join(EXPORT_FORMATS)} (or export.enabled = false).")
        if "meta_graph" in names and "saved_model" not in names:
            raise RunnerError(f"setting export.formats = {self.formats!r}: meta_graph restores its variables from the "
                              f"SavedModel's variables/ folder; add saved_model, or use tf1 for a graph with the "
                              f"weights inside.")
        return names


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir) if self.cache.dir else self.run_dir / DEFAULT_CACHE_SUBDIR

    def compatibility_fingerprint(self) -> dict:
        """The settings a checkpoint cannot be continued without (backbone and head shape)."""
        b = self.backbone
        return {"backbone": b.name, "weights": b.weights, "image_size": b.image_size,
                "alpha": b.alpha, "hidden_units": self.head.hidden_units, "head_search": self.head.search,
                "standardized": True}

    def fine_tune_fingerprint(self) -> dict:
        """What a fine-tuning checkpoint additionally depends on: which layers are trainable."""
        f = self.fine_tune
        return dict(self.compatibility_fingerprint(), from_layer=f.from_layer,
                    fraction=f.fraction if not f.from_layer else None)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Build the validated Config from a TOML file (optional) and `section.key=value` overrides.

    Nothing here looks at the file system beyond reading `path`: a stored config loads on any machine;
    checks of the environment happen when a run starts."""
    config = settings.load(Config(), path, overrides)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check the settings that depend on each other; raise RunnerError naming the fix."""
    if not config.data.dir:
        raise RunnerError("setting data.dir is empty: point it at a folder with one sub-folder of images per "
                          "class, e.g. --set data.dir=/content/flower_photos.")
    if config.split.validation_percent + config.split.test_percent >= 100:
        raise RunnerError("split.validation_percent + split.test_percent must be below 100, leaving images "
                          "to train on.")
    name = config.backbone.name
    if not (name in BACKBONE_NAMES or name.startswith(KERASHUB_HANDLES + KERASHUB_FAMILY_PREFIXES)
            or is_preset_dir(name)):
        raise RunnerError(f"setting backbone.name = {name!r} is not allowed; use one of: {', '.join(BACKBONE_NAMES)}; "
                          f"or a KerasHub DINOv2 / DINOv3 / SigLIP / CLIP preset name (e.g. "
                          f"{', '.join(KERASHUB_EXAMPLES)}), a kaggle:// or hf:// handle, or the path of a "
                          f"local preset directory (docs/backbones.md).")
    if config.backbone.weights == "none" and not config.backbone.allow_random_weights:
        raise RunnerError("backbone.weights = 'none' gives random features and meaningless accuracy; set "
                          "backbone.allow_random_weights = true if that is really what you want.")
    if config.checkpoint.every_steps == 0 and config.checkpoint.every_seconds == 0:
        raise RunnerError("checkpoint.every_steps and checkpoint.every_seconds are both 0: set at least one, "
                          "or a disconnect loses all progress.")
    config.export.format_names()  # raises on an unknown format name
    config.sync.validate()


def ignored_settings(config: Config) -> list[str]:
    """One warning for each setting changed from its default that this run's mode ignores, naming the mode
    (so no setting silently does nothing)."""
    search, fine_tune = config.head.search == "auto", config.fine_tune.enabled
    derived_rate = fine_tune and not config.fine_tune.learning_rate  # a tenth of the head stage's rate
    why_search = "head.search = auto chooses the head by validation over its own grid"
    rules = [  # (keys, ignored in this run?, why)
        (("data.labels_columns",), not config.data.labels, "data.labels is not set"),
        (("data.layout",), bool(config.data.labels), "data.labels names each image's class"),
        (("train.learning_rate",), search and not derived_rate,
         f"{why_search}; fine-tuning has its own fine_tune.learning_rate"),
        (("head.weight_decay",), search, f"{why_search} (weight decays 0 to 100 / N)"),
        (("train.decay_rate", "train.decay_steps"), search,
         f"{why_search} without a learning-rate decay; fine-tuning has its own, fine_tune.decay_rate"),
        (("eval.every_steps",), search,
         "head.search = auto validates once per epoch; fine-tuning validates every fine_tune.eval_every_steps"),
        (("train.patience",), not search, "train.patience stops candidates of head.search = auto; head.search = "
                                          "off trains the configured head for the whole budget"),
        (("train.strategy",), search and not fine_tune,
         "head.search = auto trains its stacked candidates on one device (they are small); the strategy applies "
         "to extraction (and to fine-tuning when enabled)"),
        (("backbone.alpha",), config.backbone.name not in ("mobilenet", "mobilenet_v2"),
         f"backbone.alpha is the width of mobilenet and mobilenet_v2 only, not of {config.backbone.name}"),
        (tuple(f"fine_tune.{f.name}" for f in dataclasses.fields(FineTuneConfig) if f.name != "enabled"),
         not fine_tune, "fine_tune.enabled = false"),
        (tuple(f"export.{f.name}" for f in dataclasses.fields(ExportConfig) if f.name != "enabled"),
         not config.export.enabled, "export.enabled = false"),
        (tuple(f"sync.{f.name}" for f in dataclasses.fields(SyncConfig) if f.name not in ("backend", "folder")),
         not config.sync.enabled, "sync is off (sync.folder is empty)"),
    ]
    defaults, warnings = Config(), []
    for keys, ignored, why in rules:
        changed = [key for key in keys if _value(config, key) != _value(defaults, key)]
        if ignored and changed:
            listed = ", ".join(f"{key} = {_value(config, key)!r}" for key in changed)
            warnings.append(f"{listed} {'has' if len(changed) == 1 else 'have'} no effect in this run: {why}.")
    return warnings


def _value(config: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def describe_settings() -> str:
    """Every setting with its default and help text, for --help."""
    return settings.describe(Config())


SETTINGS_PAGE_HEAD = """# Settings

Generated from the settings declarations (`runner/run/config.py`, `sync/config.py`) by
`python -m runner.run.config > docs/settings.md`; a test keeps this page equal to them. Set any key in the TOML file
(`[section]` / `key = value`) or with `--set section.key=value`: paths in a TOML file are relative to that file,
paths given with `--set` to the current directory; numbers must be finite. `python resume.py --print-config`
shows the resolved set. A setting changed from its default that the run's mode ignores (e.g. `eval.every_steps`
with `head.search = auto`, any `fine_tune.*` with fine-tuning off) is named in a warning at start.

"""


def settings_page() -> str:
    """docs/settings.md: every setting by section, with its default and meaning."""
    return SETTINGS_PAGE_HEAD + settings.markdown_reference(Config())


if __name__ == "__main__":
    print(settings_page(), end="")


def to_toml(config: Config) -> str:
    """The full resolved configuration as TOML (saved in the run dir, shown by --print-config)."""
    return settings.to_toml(config)
