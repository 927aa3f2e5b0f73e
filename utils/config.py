"""Experiment configuration: a typed schema with defaults, YAML files and command-line overrides.

A config is a tree of dataclasses (`Config` at the root). YAML files (read with `yaml.safe_load`) and
`--opts section.key=value` overrides are merged onto the defaults and checked against the schema: an
unknown key names the closest valid one, a wrong type or value says what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------- schema
@dataclass
class ExperimentConfig:
    name: str = "efficient_mtnet"
    work_dir: str = "runs"  # runs go to <work_dir>/<name>/<timestamp>
    seed: int = 42
    deterministic: bool = False  # cuDNN deterministic + torch.use_deterministic_algorithms(warn_only)


@dataclass
class AugmentConfig:
    """Training augmentations; each `p_*` is the probability of one albumentations transform (0: off)."""

    p_hflip: float = 0.5
    p_vflip: float = 0.0
    p_rotate: float = 0.5
    rotate_limit: float = 15.0  # degrees
    p_shift_scale: float = 0.3
    shift_limit: float = 0.0625  # fraction of the image size
    scale_limit: float = 0.1
    p_elastic: float = 0.0
    elastic_alpha: float = 100.0  # displacement strength, pixels at the training size
    elastic_sigma: float = 8.0  # smoothness of the displacement field, pixels
    p_brightness_contrast: float = 0.3
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    p_gamma: float = 0.0
    gamma_limit: list = field(default_factory=lambda: [80, 120])
    p_noise: float = 0.1
    noise_std: list = field(default_factory=lambda: [0.01, 0.04])  # fraction of the intensity range
    p_blur: float = 0.0
    blur_sigma: list = field(default_factory=lambda: [0.3, 1.0])  # Gaussian blur sigma range, pixels
    p_random_resized_crop: float = 0.0
    crop_scale: list = field(default_factory=lambda: [0.8, 1.0])  # area fraction kept
    crop_ratio: list = field(default_factory=lambda: [0.9, 1.1])  # aspect ratio range of the crop


@dataclass
class DataConfig:
    root: str = "data/demo_brisc"
    # When the root does not exist and `synthetic` is true, a BRISC-layout dataset is generated there once.
    synthetic: bool = False
    synthetic_train: int = 400  # classification images in the generated train split
    synthetic_test: int = 100
    synthetic_seed: int = 0
    image_size: int = 256
    in_channels: int = 3
    val_fraction: float = 0.1  # stratified share of the train split used for validation
    split_seed: int = 42
    split_file: Optional[str] = None  # reuse an existing split JSON instead of drawing a new one
    cache: str = "none"  # none | ram | disk: keep decoded, resized uint8 arrays
    cache_dir: str = ".cache/brisc"
    batch_size: int = 16
    num_workers: int = 2
    pin_memory: bool = True
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: str = "efficient_mtnet"
    num_classes: int = 4
    deep_supervision: bool = True
    pretrained: Optional[str] = None  # local weights file for baselines' encoders ("imagenet" needs a network)
    freeze_encoder_epochs: int = 0  # freeze the encoder for the first K epochs (0: never)
    freeze_stages: int = -1  # with freezing: how many encoder stages (-1: all of it)
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments of the chosen model


@dataclass
class SegLossConfig:
    """Weights of the segmentation terms; a zero weight switches a term off."""

    bce: float = 1.0
    dice: float = 1.0
    focal: float = 0.0
    tversky: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.3  # weight of false positives
    tversky_beta: float = 0.7  # weight of false negatives
    smooth: float = 1.0  # Dice / Tversky smoothing (> 0): keeps empty masks finite
    dice_per_image: bool = True  # Dice / Tversky per image, averaged (True) or over the whole batch (False)


@dataclass
class LossConfig:
    """total = cls_weight * CE + seg_weight * seg(main) + sum_i aux_weights[i] * seg(aux_i); 0 switches a task off."""

    cls_weight: float = 1.0
    seg_weight: float = 1.0
    label_smoothing: float = 0.0
    # None (unweighted), "balanced" (inverse training frequency) or one weight per class
    class_weights: Union[None, str, list] = None
    # one weight per deep-supervision output, in the order of outputs["aux"]; more outputs than weights is an error
    aux_weights: list = field(default_factory=lambda: [0.4, 0.2])
    seg: SegLossConfig = field(default_factory=SegLossConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only


@dataclass
class SchedConfig:
    name: str = "cosine"  # cosine | plateau | step | none
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    step_size: int = 10  # step
    gamma: float = 0.1  # step
    factor: float = 0.5  # plateau
    patience: int = 5  # plateau


@dataclass
class TrainConfig:
    epochs: int = 30
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (fp16 on CUDA, off on CPU) | none | fp16 | bf16
    channels_last: bool = False
    compile: bool = False
    grad_clip: float = 0.0  # max gradient norm (0: off)
    grad_accum_steps: int = 1
    ema: bool = False
    ema_decay: float = 0.999
    monitor: str = "dice"  # validation metric for best.pth, early stopping and the plateau schedule (MONITOR_MODES)
    monitor_mode: str = "auto"  # auto (min for loss-like metrics, max for the others) | max | min
    early_stop_patience: int = 0  # epochs without improvement before stopping (0: off)
    time_budget_min: float = 0.0  # wall-clock budget; training ends cleanly when it is spent (0: off)
    log_every_steps: int = 20
    image_log_every: int = 5  # epochs between image / confusion-matrix logs
    sync_bn: bool = False  # distributed runs only
    threads: int = 0  # torch CPU threads (0: leave the default)


@dataclass
class EvalConfig:
    threshold: float = 0.5
    tta: bool = False
    batch_size: int = 32
    # Autocast precision of validation and test.py alike (so test.py --split val reproduces best_val.json)
    precision: str = "fp32"  # fp32 | fp16 (CUDA) | bf16


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Values that are checked beyond their type.
_CHOICES = {
    "data.cache": ("none", "ram", "disk"),
    "optim.name": ("adamw", "sgd"),
    "sched.name": ("cosine", "plateau", "step", "none"),
    "train.amp": ("auto", "none", "fp16", "bf16"),
    "train.monitor_mode": ("auto", "max", "min"),
    "eval.precision": ("fp32", "fp16", "bf16"),
}

# Validation metrics that `train.monitor` may name, each with the direction that is better ("auto" mode).
# Per-class metrics are named `precision_<class>`, `recall_<class>`, `f1_<class>`.
MONITOR_MODES = {
    "loss": "min", "empty_fp_rate": "min",
    **{name: "max" for name in (
        "combined", "accuracy", "precision_macro", "precision_weighted", "recall_macro", "recall_weighted",
        "f1_macro", "f1_weighted", "dice", "iou", "dice_global", "iou_global", "dice_2class", "miou_2class",
        "dice_all_images", "iou_all_images", "pixel_accuracy", "sensitivity", "specificity")},
    **{f"{kind}_{cls}": "max" for kind in ("precision", "recall", "f1")
       for cls in ("glioma", "meningioma", "no_tumor", "pituitary")},
}


def monitor_mode(train_cfg: "TrainConfig") -> str:
    """'min' or 'max' for the monitored metric: the explicit `train.monitor_mode`, else the metric's own."""
    if train_cfg.monitor_mode != "auto":
        return train_cfg.monitor_mode
    return MONITOR_MODES[train_cfg.monitor]


# --------------------------------------------------------------------------------------------- merging
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Union:
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        allowed = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise ConfigError(f"config key '{key}': got {value!r} ({type(value).__name__}); expected {allowed}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, base):
            return value
    elif tp in (int, float, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}': got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")


def _merge(node: Any, updates: dict, prefix: str = "") -> None:
    """Write the mapping `updates` into the dataclass `node`, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in fields(node)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'.{hint} Valid keys here: {', '.join(names)}")
        current = getattr(node, key)
        if is_dataclass(current):
            _merge(current, value, prefix=f"{full}.")
            continue
        value = _coerce(value, hints[key], full)
        if full in _CHOICES and value not in _CHOICES[full]:
            raise ConfigError(f"config key '{full}': got {value!r}; allowed values: {', '.join(_CHOICES[full])}")
        setattr(node, key, value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into the key path and a YAML-typed value (`5` -> int, `[1,2]` -> list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def validate(cfg: Config) -> None:
    """Checks that span several keys."""
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction': got {cfg.data.val_fraction}; expected 0 <= value < 1")
    if cfg.data.in_channels not in (1, 3):
        raise ConfigError(f"config key 'data.in_channels': got {cfg.data.in_channels}; allowed values: 1, 3")
    if len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError("config keys 'data.mean' and 'data.std' must have the same length")
    cw = cfg.loss.class_weights
    if isinstance(cw, str) and cw != "balanced":
        raise ConfigError(f"config key 'loss.class_weights': got {cw!r}; allowed: null, 'balanced' or a list")
    if isinstance(cw, list) and len(cw) != cfg.model.num_classes:
        raise ConfigError(f"config key 'loss.class_weights': {len(cw)} weights for {cfg.model.num_classes} classes")
    if cfg.train.grad_accum_steps < 1:
        raise ConfigError("config key 'train.grad_accum_steps' must be >= 1")
    if cfg.train.monitor not in MONITOR_MODES:
        close = difflib.get_close_matches(cfg.train.monitor, list(MONITOR_MODES), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config key 'train.monitor': unknown validation metric {cfg.train.monitor!r}.{hint} "
                          f"Valid names: {', '.join(MONITOR_MODES)}")
    if cfg.data.image_size < 32:
        raise ConfigError(f"config key 'data.image_size': got {cfg.data.image_size}; expected >= 32")


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- `raw` <- `overrides`, validated."""
    cfg = Config()
    _merge(cfg, raw or {})
    for text in overrides or []:
        path, value = parse_override(text)
        _merge(cfg, _nest(path, value))
    validate(cfg)
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML experiment file (or only the defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for the shipped experiments)")
        with open(path, encoding="utf-8") as handle:
            try:
                raw = yaml.safe_load(handle) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as exc:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'section.key': value} for every leaf of a config (dict- and list-valued keys are leaves)."""
    flat: dict[str, Any] = {}
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            flat.update(flatten_config(value, f"{prefix}{f.name}."))
        else:
            flat[f"{prefix}{f.name}"] = value
    return flat


def override_keys(path: Optional[Union[str, Path]], overrides: Optional[list[str]]) -> set[str]:
    """The dotted keys that a YAML file and `--opts` overrides set (a section names all its keys)."""
    keys: set[str] = set()

    def walk(raw: Any, prefix: str) -> None:
        if isinstance(raw, dict) and raw:
            for key, value in raw.items():
                walk(value, f"{prefix}{key}.")
        else:
            keys.add(prefix.rstrip("."))

    if path is not None:
        with open(path, encoding="utf-8") as handle:
            walk(yaml.safe_load(handle) or {}, "")
    for text in overrides or []:
        key_path, value = parse_override(text)
        walk(_nest(key_path, value), "")
    leaves = flatten_config(Config())
    # `model.kwargs: {...}` is one leaf although its value is a mapping.
    return {next((leaf for leaf in leaves if key == leaf or key.startswith(leaf + ".")), key) for key in keys}


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)


def copy_config(cfg: Config) -> Config:
    return dataclasses.replace(config_from_dict(config_to_dict(cfg)))
