"""Experiment configuration: a typed schema with defaults, YAML files and command-line overrides.

A config is a tree of dataclasses (`Config` at the root). YAML files (read with `yaml.safe_load`) and
`--opts section.key=value` overrides are merged onto the defaults and checked against the schema: an
unknown key names the closest valid one, a wrong type or value says what is allowed.

Longer than most modules on purpose: it is the whole schema, every key of every section with its default,
its allowed values and a comment, kept in one file so that a reader finds every setting in one place. The
rule engine itself lives in `utils/schema.py`.
"""
from __future__ import annotations

import copy
import difflib
import sys
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from utils.errors import UserError
from utils.schema import PROB, spec, violation


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------- schema
# Every field declares what is valid beside its default, once: `spec(default, ge=.., gt=.., le=.., lt=..,
# choices=.., pattern=.., each=.., pair=..)` (utils/schema.py). The rules are checked on every load and
# override, and the error names the key, the bad value, what is allowed and where the value came from.
NAME = {"pattern": r"[A-Za-z0-9][A-Za-z0-9_.-]*", "pattern_help": "letters, digits, '_', '.' or '-'"}
DEVICE = {"pattern": r"auto|cpu|cuda|cuda:\d+|mps", "pattern_help": "auto, cpu, cuda, cuda:N or mps"}


@dataclass
class ExperimentConfig:
    name: str = spec("efficient_mtnet", **NAME)
    work_dir: str = spec("runs", nonempty=True)  # runs go to <work_dir>/<name>/<timestamp>
    seed: int = spec(42, ge=0)
    deterministic: bool = False  # cuDNN deterministic + torch.use_deterministic_algorithms(warn_only)


@dataclass
class AugmentConfig:
    """Training augmentations; each `p_*` is the probability of one albumentations transform (0: off)."""

    p_hflip: float = spec(0.5, **PROB)
    p_vflip: float = spec(0.0, **PROB)
    p_rotate: float = spec(0.5, **PROB)
    rotate_limit: float = spec(15.0, ge=0, le=180)  # degrees
    p_shift_scale: float = spec(0.3, **PROB)
    shift_limit: float = spec(0.0625, ge=0, le=1)  # fraction of the image size
    scale_limit: float = spec(0.1, ge=0, lt=1)
    p_elastic: float = spec(0.0, **PROB)
    elastic_alpha: float = spec(100.0, ge=0)  # displacement strength, pixels at the training size
    elastic_sigma: float = spec(8.0, gt=0)  # smoothness of the displacement field, pixels
    p_brightness_contrast: float = spec(0.3, **PROB)
    brightness_limit: float = spec(0.2, ge=0, le=1)
    contrast_limit: float = spec(0.2, ge=0, le=1)
    p_gamma: float = spec(0.0, **PROB)
    gamma_limit: list = spec(factory=lambda: [80, 120], pair=True, each={"gt": 0})  # percent
    p_noise: float = spec(0.1, **PROB)
    noise_std: list = spec(factory=lambda: [0.01, 0.04], pair=True, each={"ge": 0})  # fraction of the range
    p_blur: float = spec(0.0, **PROB)
    blur_sigma: list = spec(factory=lambda: [0.3, 1.0], pair=True, each={"ge": 0})  # Gaussian sigma, pixels
    p_random_resized_crop: float = spec(0.0, **PROB)
    crop_scale: list = spec(factory=lambda: [0.8, 1.0], pair=True, each={"gt": 0, "le": 1})  # area fraction kept
    crop_ratio: list = spec(factory=lambda: [0.9, 1.1], pair=True, each={"gt": 0})  # aspect ratio of the crop
    # MRI acquisition shifts (datasets/mri_shifts.py, the transforms of the shift benchmark), each with its own
    # probability, at a severity drawn uniformly from mri_severity (0: identity, 1-3: the benchmark's levels)
    p_bias_field: float = spec(0.0, **PROB)
    p_mri_gamma: float = spec(0.0, **PROB)
    p_mri_noise: float = spec(0.0, **PROB)  # Rician
    p_low_resolution: float = spec(0.0, **PROB)  # blur + downsample + upsample
    p_mri_intensity: float = spec(0.0, **PROB)  # global scale and offset
    p_mri_contrast: float = spec(0.0, **PROB)  # window change
    p_mri_rotate_zoom: float = spec(0.0, **PROB)
    mri_severity: list = spec(factory=lambda: [0.0, 2.0], pair=True, each={"ge": 0, "le": 3})
    # Storage cues (docs/geometry-and-confounds.md): JPEG re-encoding at a random quality, resampling down and up
    # at a random factor (both on the model-size image), and a random canvas: the decoded file cropped or padded
    # to a random aspect ratio (width / height) BEFORE the geometry step (decodes the file each time: no cache)
    p_jpeg: float = spec(0.0, **PROB)
    jpeg_quality: list = spec(factory=lambda: [30, 95], pair=True, each={"ge": 1, "le": 100})
    p_resample: float = spec(0.0, **PROB)
    resample_scale: list = spec(factory=lambda: [0.4, 0.9], pair=True, each={"gt": 0, "lt": 1})  # down factor
    p_canvas: float = spec(0.0, **PROB)
    canvas_ratio: list = spec(factory=lambda: [0.6, 1.6], pair=True, each={"gt": 0})
    # Acquisition shifts that the shift benchmark does not contain (datasets/mri_shifts.py lists what imitates
    # which shift): a reconstruction filter (sharpening) and a coarser bit depth (posterize, bits kept)
    p_sharpen: float = spec(0.0, **PROB)
    p_posterize: float = spec(0.0, **PROB)
    posterize_bits: list = spec(factory=lambda: [4, 7], pair=True, each={"ge": 1, "le": 8})


# What each data.format holds: the one declaration of which tasks a layout can train and score (config checks,
# test.py on another dataset). brisc: classes and masks; imagefolder: classes only; pairs: masks only.
LAYOUT_TASKS = {"brisc": ("cls", "seg"), "imagefolder": ("cls",), "pairs": ("seg",)}


@dataclass
class LayoutConfig:
    """How data.root is laid out beyond data.format (test.py --layout sets these for another dataset)."""

    train_dir: str = spec("Training", nonempty=True)  # imagefolder: the train split's folder
    test_dir: str = spec("Testing", nonempty=True)  # imagefolder: the test split's folder
    class_map: dict = field(default_factory=dict)  # imagefolder: folder name -> class (e.g. notumor: no_tumor)
    # pairs: a mask's stem is its image's stem + this (e.g. _mask; empty: the same stem)
    mask_suffix: str = spec("", pattern=r"[A-Za-z0-9_.-]*", pattern_help="letters, digits, '_', '.' or '-' (or empty)")
    mask_threshold: int = spec(128, ge=1, le=255)  # pairs: grey level from which a mask pixel is tumour
    test_fraction: float = spec(0.2, gt=0, lt=1)  # pairs without train/ and test/ folders: seeded test share
    # [row, col] millimetres per pixel of the original images: HD95 / ASSD in mm (null: in pixels)
    spacing: Optional[list] = spec(None, each={"gt": 0})


@dataclass
class SplitConfig:
    """How the train folder is split into train / validation (/ dev_test, / folds)."""

    val_fraction: float = spec(0.1, ge=0, lt=1)  # stratified share of the train split used for validation
    seed: int = spec(42, ge=0)  # also the seed of the pairs layout's test share
    file: Optional[str] = spec(None, nonempty=True)  # reuse an existing split JSON instead of drawing one
    # Keep each group of duplicate content (identical pixels, or 32x32-thumbnail correlation >= near_threshold)
    # on one side of the train/val split and in one fold, so no validation image has a copy in training.
    group_duplicates: bool = True
    # BRISC 2025: rescaled copies >= 0.9928; neighbouring slices of a scan up to 0.9921
    near_threshold: float = spec(0.99, gt=0, le=1)
    # Scan-level groups: similarity chains of 32x32-thumbnail correlation >= group_threshold (slices likely from
    # one scan; docs/statistics.md). groups "scan" keeps each such group on one side of every split part.
    group_threshold: float = spec(0.96, gt=0, le=1)  # measured: docs/statistics.md
    groups: str = spec("duplicates", choices=("duplicates", "scan"))
    # a held-out `dev_test` part of the train folder (share of each class of the release), carved from what
    # the validation part leaves: never used for early stopping, checkpoints, thresholds or temperatures
    test_dev_fraction: float = spec(0.0, ge=0, lt=0.5)
    folds: int = spec(0, ge=0)  # K-fold cross-validation: 0 = off (val_fraction split), else K >= 2 folds ...
    fold: int = spec(0, ge=0)  # ... and this fold (0..K-1) is the validation part


@dataclass
class PreprocessConfig:
    """From a decoded file to the model's input array (training, test.py, prediction and the web demo alike)."""

    image_size: int = spec(256, ge=32)
    in_channels: int = spec(3, choices=(1, 3))
    # stretch to a square, scale the longest side and pad (letterbox), or crop the head's square (head: the
    # file's canvas does not reach the model; datasets/geometry.py, docs/geometry-and-confounds.md)
    resize: str = spec("stretch", choices=("stretch", "letterbox", "head"))
    head_margin: float = spec(0.05, ge=0, le=1)  # head: margin on each side, fraction of the head box's longer side
    mean: list = spec(factory=lambda: [0.485, 0.456, 0.406], each={"ge": 0, "le": 1})
    std: list = spec(factory=lambda: [0.229, 0.224, 0.225], each={"gt": 0})
    # imagenet: fixed mean/std above; zscore: per image, mean/std of the head (pixels above the image mean);
    # percentile: per image, clip to the percentile_range and scale to [0, 1], then mean/std above
    intensity_norm: str = spec("imagenet", choices=("imagenet", "zscore", "percentile"))
    percentile_range: list = spec(factory=lambda: [0.5, 99.5], pair=True, each={"ge": 0, "le": 100})


@dataclass
class LoaderConfig:
    batch_size: int = spec(16, ge=1)  # training batches (evaluation: eval.batch_size)
    num_workers: int = spec(2, ge=0)
    pin_memory: bool = True
    cache: str = spec("none", choices=("none", "ram", "disk"))  # keep decoded, resized uint8 arrays
    cache_dir: str = spec(".cache/brisc", nonempty=True)


@dataclass
class GeneratedDataConfig:
    """Demo data: when data.root does not exist and `enabled` is true, a dataset of data.format is generated there."""

    enabled: bool = False
    train: int = spec(400, ge=1)  # classification images in the generated train split
    test: int = spec(100, ge=1)
    seed: int = spec(0, ge=0)
    train_duplicates: int = spec(0, ge=0)  # train images that copy another train image
    leaks: int = spec(0, ge=0)  # test images that copy a train image


@dataclass
class DataConfig:
    root: str = spec("data/demo_brisc", nonempty=True)
    # Layout of data.root: brisc (BRISC 2025), imagefolder (<root>/<train_dir|test_dir>/<class>/*, classification
    # only) or pairs (<root>/images + <root>/masks matched by stem, or <root>/{train,test}/{images,masks};
    # segmentation only). See datasets/imagefolder.py and datasets/pairs.py.
    format: str = spec("brisc", choices=tuple(LAYOUT_TASKS))
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    generated: GeneratedDataConfig = field(default_factory=GeneratedDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# The data keys before the data section had sections (checkpoints and configs written until 2026-12): old key ->
# its place now. Read everywhere (files, --opts, checkpoints) with one line saying the new name.
MOVED_DATA_KEYS = {
    **{key: f"layout.{key}" for key in ("train_dir", "test_dir", "class_map", "mask_suffix", "mask_threshold",
                                        "test_fraction", "spacing")},
    **{key: f"split.{key}" for key in ("val_fraction", "group_duplicates", "near_threshold", "group_threshold",
                                       "test_dev_fraction", "folds", "fold")},
    "split_seed": "split.seed", "split_file": "split.file", "split_groups": "split.groups",
    **{key: f"preprocess.{key}" for key in ("image_size", "in_channels", "resize", "head_margin", "mean", "std",
                                            "intensity_norm", "percentile_range")},
    **{key: f"loader.{key}" for key in ("batch_size", "num_workers", "pin_memory", "cache", "cache_dir")},
    "synthetic": "generated.enabled", "synthetic_train": "generated.train", "synthetic_test": "generated.test",
    "synthetic_seed": "generated.seed", "synthetic_train_duplicates": "generated.train_duplicates",
    "synthetic_leaks": "generated.leaks",
}


@dataclass
class ModelConfig:
    name: str = spec("efficient_mtnet", nonempty=True)  # a registered model: model.list_models()
    num_classes: int = spec(4, ge=2)
    deep_supervision: bool = True
    pretrained: Optional[str] = spec(None, nonempty=True)  # local weights file for baselines' encoders
    freeze_encoder_epochs: int = spec(0, ge=0)  # freeze the encoder for the first K epochs (0: never)
    freeze_stages: int = spec(-1, ge=-1)  # with freezing: how many encoder stages (-1: all of it)
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments of the chosen model


@dataclass
class SegLossConfig:
    """Weights of the segmentation terms; a zero weight switches a term off."""

    bce: float = spec(1.0, ge=0)
    dice: float = spec(1.0, ge=0)
    focal: float = spec(0.0, ge=0)
    tversky: float = spec(0.0, ge=0)
    focal_alpha: float = spec(0.25, **PROB)
    focal_gamma: float = spec(2.0, ge=0)
    tversky_alpha: float = spec(0.3, ge=0)  # weight of false positives
    tversky_beta: float = spec(0.7, ge=0)  # weight of false negatives
    smooth: float = spec(1.0, gt=0)  # Dice / Tversky smoothing: keeps empty masks finite
    dice_per_image: bool = True  # Dice / Tversky per image, averaged (True) or over the whole batch (False)


@dataclass
class LossConfig:
    """total = cls_weight * CE + seg_weight * seg(main) + sum_i aux_weights[i] * seg(aux_i); 0 switches a task off."""

    cls_weight: float = spec(1.0, ge=0)
    seg_weight: float = spec(1.0, ge=0)
    label_smoothing: float = spec(0.0, ge=0, lt=1)
    # None (unweighted), "balanced" (inverse training frequency) or one weight per class
    class_weights: Union[None, str, list] = spec(None, choices=("balanced",), each={"ge": 0})
    # one weight per deep-supervision output, in the order of outputs["aux"]; more outputs than weights is an error
    aux_weights: list = spec(factory=lambda: [0.4, 0.2], each={"ge": 0})
    seg: SegLossConfig = field(default_factory=SegLossConfig)


@dataclass
class OptimConfig:
    name: str = spec("adamw", choices=("adamw", "adam", "sgd"))  # adam: L2 weight decay in the gradient
    lr: float = spec(1e-3, gt=0)  # 0 is refused: a run at learning rate 0 trains nothing
    weight_decay: float = spec(1e-4, ge=0)
    momentum: float = spec(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = True  # sgd only


@dataclass
class SchedConfig:
    name: str = spec("cosine", choices=("cosine", "plateau", "step", "none"))
    warmup_epochs: float = spec(1.0, ge=0)
    min_lr: float = spec(1e-6, ge=0)
    step_size: int = spec(10, ge=1)  # step
    gamma: float = spec(0.1, gt=0, le=1)  # step
    factor: float = spec(0.5, gt=0, lt=1)  # plateau
    patience: int = spec(5, ge=0)  # plateau


@dataclass
class TrainConfig:
    epochs: int = spec(30, ge=1)
    device: str = spec("auto", **DEVICE)
    amp: str = spec("auto", choices=("auto", "none", "fp16", "bf16"))  # auto: fp16 on CUDA, off on CPU
    channels_last: bool = False
    compile: bool = False
    grad_clip: float = spec(0.0, ge=0)  # max gradient norm (0: off)
    grad_accum_steps: int = spec(1, ge=1)
    ema: bool = False
    ema_decay: float = spec(0.999, gt=0, lt=1)
    # validation metric for best.pth, early stopping and the plateau schedule (one of MONITOR_MODES)
    monitor: str = spec("dice", nonempty=True)
    monitor_mode: str = spec("auto", choices=("auto", "max", "min"))  # auto: min for loss-like metrics, else max
    early_stop_patience: int = spec(0, ge=0)  # epochs without improvement before stopping (0: off)
    time_budget_min: float = spec(0.0, ge=0)  # wall-clock budget; training ends cleanly when it is spent (0: off)
    log_every_steps: int = spec(20, ge=1)
    image_log_every: int = spec(5, ge=0)  # epochs between image / confusion-matrix logs (0: never)
    sync_bn: bool = False  # distributed runs only
    threads: int = spec(0, ge=0)  # torch CPU threads (0: leave the default)


@dataclass
class EvalConfig:
    threshold: float = spec(0.5, gt=0, lt=1)
    tta: bool = False
    batch_size: int = spec(32, ge=1)
    # Autocast precision of validation and test.py alike (so test.py --split val reproduces best_val.json)
    precision: str = spec("fp32", choices=("fp32", "fp16", "bf16"))  # fp16: CUDA only
    # test.py: empty the mask where the classifier says no_tumor (both ways are reported; README says why off)
    gate_masks: bool = False
    # Inference runtime of test.py and the shift benchmark (model.runtime); INT8 precisions run on onnxruntime only
    # (docs/runtime.md). torch/fp32 is the eager model the README's figures used.
    runtime: str = spec("torch", choices=("torch", "onnxruntime", "torchscript"))
    runtime_precision: str = spec("fp32", choices=("fp32", "int8-dynamic", "int8-static"))
    # Runtime of prediction (`test.py --input`, the web demo): auto = onnxruntime on a CPU (2.5-3x faster than eager,
    # identical validation figures: docs/runtime.md), eager torch on a GPU; falls back to torch if the export fails
    predict_runtime: str = spec("auto", choices=("auto", "torch", "onnxruntime", "torchscript"))


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


# The task each validation metric belongs to ("loss" and "combined" exist for every run).
CLS_MONITORS = {"accuracy", *(k for k in MONITOR_MODES if k.startswith(("precision_", "recall_", "f1_")))}
SEG_MONITORS = set(MONITOR_MODES) - CLS_MONITORS - {"loss", "combined"}


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


def _where(key: str, origins: dict[str, str]) -> str:
    return f" ({origins[key]})" if key in origins else ""


def _merge(node: Any, updates: dict, origin: Optional[str], origins: dict[str, str], prefix: str = "") -> None:
    """Write the mapping `updates` into the dataclass `node`, checking keys and types; records in `origins`
    where each key's value came from ("in <file>", "from --opts key=value")."""
    suffix = f" ({origin})" if origin else ""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}"
                          f"{suffix}")
    if isinstance(node, DataConfig):
        updates = _sectioned_data(updates, origin)
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in fields(node)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{suffix}.{hint} Valid keys here: {', '.join(names)}")
        current = getattr(node, key)
        if is_dataclass(current):
            _merge(current, value, origin, origins, prefix=f"{full}.")
            continue
        try:
            value = _coerce(value, hints[key], full)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{suffix}") from None
        setattr(node, key, value)
        if origin:
            origins[full] = origin


_NOTED: set[str] = set()


def _note_moved(old: str, new: str, origin: Optional[str]) -> None:
    """One line per old key and process; silent for checkpoints (origin None), which carry old keys for ever."""
    if origin and old not in _NOTED:
        _NOTED.add(old)
        print(f"note: config key 'data.{old}' is now 'data.{new}' ({origin}); it is read as the new key",
              file=sys.stderr)


def _sectioned_data(updates: Any, origin: Optional[str]) -> Any:
    """A `data` mapping with the keys of MOVED_DATA_KEYS put into their sections."""
    if not isinstance(updates, dict) or not any(key in MOVED_DATA_KEYS for key in updates):
        return updates
    out: dict = {}
    for key, value in updates.items():
        if key not in MOVED_DATA_KEYS:
            out[key] = value if not isinstance(value, dict) or key not in out else {**out[key], **value}
            continue
        section, name = MOVED_DATA_KEYS[key].split(".")
        _note_moved(key, MOVED_DATA_KEYS[key], origin)
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][name] = value
    return out


def current_key_path(path: list[str], origin: Optional[str] = None) -> list[str]:
    """`path` with an old flat data key (`data.image_size`) replaced by its place now (`data.preprocess.image_size`)."""
    if len(path) >= 2 and path[0] == "data" and path[1] in MOVED_DATA_KEYS:
        _note_moved(path[1], MOVED_DATA_KEYS[path[1]], origin)
        return ["data", *MOVED_DATA_KEYS[path[1]].split("."), *path[2:]]
    return path


def check_values(node: Any, origins: Optional[dict[str, str]] = None, prefix: str = "") -> None:
    """Check every field of a config tree against the rules declared in its schema."""
    for f in fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if is_dataclass(value):
            check_values(value, origins, prefix=f"{key}.")
            continue
        allowed = violation(value, f.metadata.get("rules", {}))
        if allowed:
            raise ConfigError(f"config key '{key}': got {value!r}; expected {allowed}{_where(key, origins or {})}")


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


def _override_tree(cfg: Config, path: list[str], value: Any) -> dict:
    """The nested mapping that the override `path=value` merges into `cfg`.

    A path that goes inside a mapping-valued key (`model.kwargs.ham_rank=8`) sets that one entry and keeps the
    mapping's other entries (from the file or from earlier overrides); `model.kwargs={...}` replaces it whole.
    """
    node: Any = cfg
    for depth, part in enumerate(path[:-1]):
        if not (is_dataclass(node) and part in {f.name for f in fields(node)}):
            break  # an unknown key: _merge names it
        node = getattr(node, part)
        if isinstance(node, dict):
            merged = copy.deepcopy(node)
            inner = merged
            for sub in path[depth + 1:-1]:
                if not isinstance(inner.get(sub), dict):
                    inner[sub] = {}
                inner = inner[sub]
            inner[path[-1]] = value
            return _nest(path[:depth + 1], merged)
    return _nest(path, value)


SEG_TERMS = ("bce", "dice", "focal", "tversky")


def check_seg_loss(seg: SegLossConfig, origins: Optional[dict[str, str]] = None) -> None:
    """The `loss.seg` keys, each by its schema rules and together."""
    check_values(seg, origins, prefix="loss.seg.")
    if not any(getattr(seg, name) > 0 for name in SEG_TERMS):
        raise ConfigError("config section 'loss.seg' has no term with a positive weight (bce, dice, focal, tversky); "
                          "give one a weight, or set loss.seg_weight=0 to train classification only")
    if seg.tversky_alpha + seg.tversky_beta <= 0:
        raise ConfigError("config keys 'loss.seg.tversky_alpha' and 'loss.seg.tversky_beta' are both 0; give one "
                          "a positive weight")


def check_loss(loss: LossConfig, origins: Optional[dict[str, str]] = None) -> None:
    """The `loss` keys, each by its schema rules and together (also used when a loss is built in code)."""
    check_values(loss, origins, prefix="loss.")
    check_seg_loss(loss.seg, origins)
    if loss.cls_weight == 0 and loss.seg_weight == 0:
        raise ConfigError("config keys 'loss.cls_weight' and 'loss.seg_weight' are both 0: there is nothing to "
                          "train (auxiliary outputs alone are not scored in evaluation)")


def validate(cfg: Config, origins: Optional[dict[str, str]] = None) -> None:
    """Checks that span several keys (single values are checked by the rules of their schema field)."""
    origins = origins or {}
    check_loss(cfg.loss, origins)
    if cfg.data.split.folds == 1:
        raise ConfigError(f"config key 'data.split.folds': got {cfg.data.split.folds}; expected 0 (off) or >= 2"
                          f"{_where('data.split.folds', origins)}")
    if cfg.data.split.folds and not 0 <= cfg.data.split.fold < cfg.data.split.folds:
        raise ConfigError(f"config key 'data.split.fold': got {cfg.data.split.fold}; expected 0 <= fold < "
                          f"data.split.folds ({cfg.data.split.folds}){_where('data.split.fold', origins)}")
    if len(cfg.data.preprocess.mean) != len(cfg.data.preprocess.std):
        raise ConfigError("config keys 'data.preprocess.mean' and 'data.preprocess.std' must have the same length"
                          f"{_where('data.preprocess.std', origins) or _where('data.preprocess.mean', origins)}")
    if cfg.data.layout.spacing is not None and len(cfg.data.layout.spacing) != 2:
        raise ConfigError(f"config key 'data.layout.spacing': got {cfg.data.layout.spacing}; expected [row, col] "
                          f"millimetres per pixel (two numbers > 0) or null{_where('data.layout.spacing', origins)}")
    if cfg.eval.runtime_precision != "fp32" and cfg.eval.runtime != "onnxruntime":
        raise ConfigError(f"config key 'eval.runtime_precision': {cfg.eval.runtime_precision} runs on eval.runtime "
                          f"onnxruntime only (got {cfg.eval.runtime}){_where('eval.runtime_precision', origins)}")
    cw = cfg.loss.class_weights
    if isinstance(cw, list) and len(cw) != cfg.model.num_classes:
        raise ConfigError(f"config key 'loss.class_weights': {len(cw)} weights for {cfg.model.num_classes} classes"
                          f"{_where('loss.class_weights', origins)}")
    if cfg.train.monitor not in MONITOR_MODES:
        close = difflib.get_close_matches(cfg.train.monitor, list(MONITOR_MODES), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config key 'train.monitor': unknown validation metric {cfg.train.monitor!r}"
                          f"{_where('train.monitor', origins)}.{hint} Valid names: {', '.join(MONITOR_MODES)}")


def _check_monitor_task(cfg: Config, origins: dict[str, str]) -> None:
    """A single-task run (`loss.cls_weight: 0` or `loss.seg_weight: 0`) cannot monitor the other task's metric;
    a layout without masks (imagefolder) or without classes (pairs) trains one task only."""
    fmt, tasks = cfg.data.format, LAYOUT_TASKS[cfg.data.format]
    for task, key, what in (("seg", "loss.seg_weight", "masks"), ("cls", "loss.cls_weight", "classes")):
        if task not in tasks and getattr(cfg.loss, key.split(".")[1]) > 0:
            raise ConfigError(f"config key '{key}': data.format={fmt} has no {what}, so {key} must be 0"
                              f"{' and loss.aux_weights=[]' if what == 'masks' else ''}{_where(key, origins)}")
    for weight_key, weight, metrics, task in (("loss.cls_weight", cfg.loss.cls_weight, CLS_MONITORS, "classification"),
                                              ("loss.seg_weight", cfg.loss.seg_weight, SEG_MONITORS, "segmentation")):
        if weight == 0 and cfg.train.monitor in metrics:
            raise ConfigError(f"config key 'train.monitor': {cfg.train.monitor!r} is a {task} metric but "
                              f"{weight_key}=0 makes this a run without {task}{_where('train.monitor', origins)}; "
                              "monitor 'combined' (the task trained), 'loss' or a metric of the trained task")


def read_yaml_file(path: Path, what: str, missing_hint: str = "") -> Any:
    """The parsed YAML of `path`; a missing file or bad YAML is a ConfigError naming `what` and the path
    (`missing_hint` is appended to the missing-file message)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist{missing_hint}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = " ".join(str(exc).split())  # the parser's message spans lines: the user sees one
        raise ConfigError(f"{what} '{path}' is not valid YAML: {where}") from exc


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None, source: Optional[str] = None) -> Config:
    """Defaults <- `raw` <- `overrides`, validated; `source` says where `raw` came from (e.g. "in exp.yaml")."""
    cfg = Config()
    origins: dict[str, str] = {}
    _merge(cfg, raw or {}, source, origins)
    for text in overrides or []:
        path, value = parse_override(text)
        path = current_key_path(path, f"from --opts {text}")
        _merge(cfg, _override_tree(cfg, path, value), f"from --opts {text}", origins)
    check_values(cfg, origins)
    validate(cfg, origins)
    _check_monitor_task(cfg, origins)
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None,
                saved_by_a_run: bool = False) -> Config:
    """Load a YAML experiment file (or only the defaults when `path` is None) and apply overrides.

    `saved_by_a_run`: the file is a run's own `config.yaml`, written by train.py; an older run's flat data keys
    are then read without a note, as a checkpoint's are (nobody is going to edit it)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml_file(path, "config file", " (see configs/ for the shipped experiments)") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
        if saved_by_a_run and isinstance(raw.get("data"), dict):
            raw["data"] = _sectioned_data(raw["data"], None)
    return config_from_dict(raw, overrides, source=f"in {path}" if path is not None else None)


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
            if prefix == "data.":
                raw = _sectioned_data(raw, None)
            for key, value in raw.items():
                walk(value, f"{prefix}{key}.")
        else:
            keys.add(prefix.rstrip("."))

    if path is not None:
        with open(path, encoding="utf-8") as handle:
            walk(yaml.safe_load(handle) or {}, "")
    for text in overrides or []:
        key_path, value = parse_override(text)
        walk(_nest(current_key_path(key_path), value), "")
    leaves = flatten_config(Config())
    # `model.kwargs: {...}` is one leaf although its value is a mapping.
    return {next((leaf for leaf in leaves if key == leaf or key.startswith(leaf + ".")), key) for key in keys}


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)
