"""What test.py was asked to do (`TestOptions`) and the settings it refuses before anything runs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from evaluation.subsets import HEADLINE_SUBSETS
from utils.config import ConfigError

THRESHOLD_CANDIDATES = [round(t, 2) for t in np.arange(0.2, 0.81, 0.05)]


@dataclass
class TestOptions:
    checkpoint: Path
    split: str = "test"
    data_root: Optional[str] = None
    tta: bool = False
    threshold: Optional[float] = None
    tune_threshold: bool = False
    out_dir: Optional[Path] = None
    device: str = "auto"
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    use_ema: bool = True
    gradcam: int = 0
    gradcam_layer: Optional[str] = None
    show_progress: bool = True
    subset: str = "leak_free"  # what the headline figures (top level of metrics.json) describe
    calibrate: bool = False
    bootstrap: int = 1000  # resamples for the 95 % intervals; 0: none
    seed: int = 0
    gate_masks: Optional[bool] = None  # empty the mask when the classifier says no_tumor; None: eval.gate_masks
    spacing: Optional[list] = None  # [row, col] mm per pixel for HD95 / ASSD; None: data.layout.spacing of the run
    # Another dataset's layout (brisc | imagefolder | pairs) at data_root: evaluation.sources.other_dataset
    data_format: Optional[str] = None
    class_map: Optional[dict] = None  # name -> label for the other dataset; None: data.layout.class_map of the run
    data_opts: Optional[list] = None  # `data.<layout key>=value` settings of the other dataset (test.py --layout)
    # Inference runtime and precision (model.runtime); None: eval.runtime / eval.runtime_precision of the run
    runtime: Optional[str] = None
    precision: Optional[str] = None


def check_options(opts: TestOptions) -> None:
    """Refuse settings that would score a split with something fitted on that same split."""
    if opts.subset not in HEADLINE_SUBSETS:
        raise ConfigError(f"--subset must be one of {', '.join(HEADLINE_SUBSETS)}, got '{opts.subset}'")
    for flag, used in (("--tune-threshold", opts.tune_threshold), ("--calibrate", opts.calibrate)):
        if used and opts.split == "val":
            raise ConfigError(f"{flag} fits on the validation split, so it cannot also score --split val (the "
                              "figures would be optimistic); score another split, e.g. --split test")
    if opts.tune_threshold and opts.threshold is not None:
        raise ConfigError("--threshold and --tune-threshold exclude each other: give a threshold or tune one")
    if opts.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0 (0: no intervals), got {opts.bootstrap}")


def check_tasks(opts: TestOptions, model_name: str, has_cls: bool, has_seg: bool) -> None:
    """Refuse options that need a task the run does not train."""
    for flag, used in (("--calibrate", opts.calibrate), ("--gradcam", opts.gradcam > 0)):
        if used and not has_cls:
            raise ConfigError(f"{flag}: the run of '{model_name}' trains no classifier (loss.cls_weight=0), so "
                              "there are no class scores to use; drop the option")
    if opts.tune_threshold and not has_seg:
        raise ConfigError(f"--tune-threshold: model '{model_name}' has no segmentation output, so there is no "
                          "mask threshold to tune; drop the option")
