"""The typed run configuration: TOML file + `--set section.key=value` overrides, validated once.

This module does not import TensorFlow, so `resume.py --help` and `--print-config` stay fast.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from sync.config import SyncConfig


def _opt(default, help: str, choices: tuple | None = None, min: float | None = None,
         max: float | None = None):
    """A config field with its help text, allowed values and range."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max})


@dataclass
class DataConfig:
    dir: str = _opt("", "folder with one sub-folder of images per class")
    min_images_per_class: int = _opt(5, "a class with fewer valid images stops the run early", min=1)


@dataclass
class RunConfig:
    dir: str = _opt("runs/default", "run directory: checkpoints, cache, metrics, summary")


@dataclass
class SplitConfig:
    validation_percent: float = _opt(10.0, "share of images for validation (stable hash split)", min=0, max=90)
    test_percent: float = _opt(10.0, "share of images for the final test (stable hash split)", min=0, max=90)


BACKBONE_NAMES = ("inception_v3", "mobilenet_v2", "mobilenet", "efficientnet_b0", "resnet50")


@dataclass
class BackboneConfig:
    name: str = _opt("mobilenet_v2", "frozen ImageNet CNN that makes the bottlenecks", choices=BACKBONE_NAMES)
    weights: str = _opt("imagenet", "'imagenet' (downloaded), a local weights file path, or 'none' (random)")
    image_size: int = _opt(0, "input size in pixels; 0 = the backbone's default", min=0, max=1024)
    alpha: float = _opt(1.0, "width multiplier of MobileNet / MobileNetV2", min=0.1, max=2.0)
    allow_random_weights: bool = _opt(False, "must be true to accept weights='none' (accuracy is meaningless)")
    mixed_precision: bool = _opt(False, "extract bottlenecks computing in float16 (for GPUs; vectors are stored "
                                        "as cache.dtype either way; slower on a CPU)")
    xla: bool = _opt(False, "compile the extraction forward pass with XLA (for GPUs; much slower on a CPU)")


@dataclass
class CacheConfig:
    dir: str = _opt("", "bottleneck cache folder; '' = RUN_DIR/cache (share it between runs to reuse vectors)")
    dtype: str = _opt("float16", "storage type of cached vectors", choices=("float16", "float32"))
    shard_size: int = _opt(512, "vectors per cache shard (a kill loses at most one shard)", min=1)
    batch_size: int = _opt(32, "images per forward pass during extraction", min=1)


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
    learning_rate: float = _opt(0.001, "RMSProp learning rate with head.search = off; fine-tuning uses a tenth",
                                min=0.0)
    rho: float = _opt(0.9, "RMSProp discounting factor", min=0.0, max=1.0)
    momentum: float = _opt(0.0, "RMSProp momentum", min=0.0, max=1.0)
    epsilon: float = _opt(1e-7, "RMSProp epsilon", min=0.0)
    decay_rate: float = _opt(1.0, "exponential learning-rate decay per decay_steps; 1.0 = none", min=0.0, max=1.0)
    decay_steps: int = _opt(1000, "steps per learning-rate decay", min=1)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy", min=0.0, max=0.5)
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
    every_steps: int = _opt(100, "validate every N training steps", min=1)


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
    batch_size: int = _opt(32, "images per fine-tuning step", min=1)
    flip: bool = _opt(True, "augment: random horizontal flip")
    crop_scale: float = _opt(0.8, "augment: random crop keeping at least this share of the side; 1 = off",
                             min=0.3, max=1.0)
    brightness: float = _opt(0.1, "augment: random brightness change up to this share of full scale; 0 = off",
                             min=0.0, max=0.5)
    rotation: float = _opt(5.0, "augment: random rotation up to this many degrees; 0 = off", min=0.0, max=45.0)


EXPORT_FORMATS = {  # name → what it writes into RUN_DIR/export (model.json is always written)
    "saved_model": "saved_model.pb + variables/ (TF2; what runner.classify loads)",
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
    formats: str = _opt("saved_model,tflite,labels", "comma-separated formats to write, from: "
                        + ", ".join(EXPORT_FORMATS) + " (each full-size format is one more copy of the backbone)")

    def format_names(self) -> tuple[str, ...]:
        """The formats asked for by export.formats, each a key of EXPORT_FORMATS."""
        names = tuple(dict.fromkeys(n.strip() for n in self.formats.split(",") if n.strip()))
        unknown = [n for n in names if n not in EXPORT_FORMATS]
        if unknown or not names:
            raise RunnerError(f"setting export.formats = {self.formats!r}: "
                              f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; use a "
                              f"comma-separated list of {', '.join(EXPORT_FORMATS)} (or export.enabled = false).")
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
        return Path(self.cache.dir) if self.cache.dir else self.run_dir / "cache"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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


def _sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Turn a TOML or --set value into the field's type, or explain what was expected."""
    kind = {"str": str, "int": int, "float": float, "bool": bool}[annotation]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise RunnerError(f"setting {key} = {value!r}: expected a {annotation}.")


def _check_field(key: str, value: Any, meta: dict) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if choices and value not in choices:
        raise RunnerError(f"setting {key} = {value!r} is not allowed; use one of: {', '.join(map(str, choices))}.")
    if lo is not None and value < lo:
        raise RunnerError(f"setting {key} = {value!r} is too small; it must be at least {lo}.")
    if hi is not None and value > hi:
        raise RunnerError(f"setting {key} = {value!r} is too large; it must be at most {hi}.")


def _apply(config: Config, key: str, value: Any, source: str) -> None:
    section_name, _, name = key.partition(".")
    sections = _sections(config)
    if section_name not in sections or not name:
        raise RunnerError(f"{source}: unknown setting '{key}'. Sections are: {', '.join(sections)} "
                          f"(run `python resume.py --print-config` to see every key).")
    section = sections[section_name]
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise RunnerError(f"{source}: unknown setting '{key}'. Keys of [{section_name}] are: "
                          f"{', '.join(fields)}.")
    hints = typing.get_type_hints(type(section))
    coerced = _coerce(key, value, hints[name].__name__)
    _check_field(key, coerced, fields[name].metadata)
    setattr(section, name, coerced)


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` → (key, value typed as TOML reads it; a bare string otherwise)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RunnerError(f"--set {text!r}: write it as section.key=value, e.g. --set train.steps=8000.")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare string such as a path
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Build the validated Config from a TOML file (optional) and `section.key=value` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise RunnerError(f"config file {path} does not exist; pass an existing file to --config "
                              f"(see configs/ for examples).") from None
        except tomllib.TOMLDecodeError as e:
            raise RunnerError(f"config file {path} is not valid TOML: {e}.") from None
        for section_name, section in table.items():
            if not isinstance(section, dict):
                raise RunnerError(f"{path}: '{section_name}' must be a [section] table, not a bare value.")
            for name, value in section.items():
                _apply(config, f"{section_name}.{name}", value, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _apply(config, key, value, "--set")
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
    if config.backbone.weights == "none" and not config.backbone.allow_random_weights:
        raise RunnerError("backbone.weights = 'none' gives random features and meaningless accuracy; set "
                          "backbone.allow_random_weights = true if that is really what you want.")
    if config.checkpoint.every_steps == 0 and config.checkpoint.every_seconds == 0:
        raise RunnerError("checkpoint.every_steps and checkpoint.every_seconds are both 0: set at least one, "
                          "or a disconnect loses all progress.")
    config.export.format_names()  # raises on an unknown format name
    try:
        config.sync.validate()
    except Exception as e:  # sync raises its own error type; show it as a config error here
        raise RunnerError(str(e)) from None


def describe_settings() -> str:
    """Every setting with its default and help text, for --help."""
    lines = []
    for section_name, section in _sections(Config()).items():
        for f in dataclasses.fields(section):
            meta = f.metadata
            extra = f" (one of: {', '.join(meta['choices'])})" if meta.get("choices") else ""
            lines.append(f"  {section_name}.{f.name} = {getattr(section, f.name)!r}: "
                         f"{meta.get('help', '')}{extra}")
    return "\n".join(lines)


def to_toml(config: Config) -> str:
    """The full resolved configuration as TOML (saved in the run dir, shown by --print-config)."""
    out = []
    for section_name, section in config.to_dict().items():
        out.append(f"[{section_name}]")
        for key, value in section.items():
            out.append(f"{key} = {json.dumps(value)}")
        out.append("")
    return "\n".join(out)


def fingerprint_hash(fingerprint: dict) -> str:
    """A short stable hash of a compatibility fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
