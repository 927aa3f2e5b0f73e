"""What a set of test figures means: split, subset, resolution, threshold, TTA, calibration.

`test.py` writes these settings into metrics.json and into its output folder's name (so two runs with
different settings never overwrite each other), and every table built from metrics.json files (the README's
results, `benchmark.py --metrics`) names them per row and refuses to put figures of different conventions
side by side as if they were comparable.
"""
from __future__ import annotations

from typing import Sequence

CONVENTIONS_MD = """\
How `test.py` scores (keys of `metrics.json`):

- **Resolution.** Every segmentation key (`dice`, `iou`, `dice_global`, `dice_2class`, ...) is scored at each
  image's own size: the logits are upsampled bilinearly from the model's size to the original height x width
  (then thresholded) and compared with the original mask file binarised at >= 128; pixel counts are kept per
  image, since sizes vary (`"resolution": "native"`). The same keys with the suffix `_train_res`
  (`dice_train_res`, `iou_train_res`, `dice_2class_train_res`, ...) are scored at the training resolution
  against the mask as the loader resizes it, the convention of validation during training.
- **Subsets.** `leaked`: evaluated images whose decoded pixels are identical or near-identical to a training
  image (for `--split test` the release's train split, for `--split val` the train part of the run's
  `split.json`); `leak_free`: the others; `all`: every image. `subsets` holds every figure for each;
  `leak_check.excluded` lists the leaked images, the training images they match and why. The top-level
  (headline) figures are those of `headline_subset`: `leak_free` unless `--subset all` (for `--split train`,
  which is the training data itself, only `all` exists). The test loss `loss` is over all images.
- **Intervals.** `ci95` (per subset): 95 % percentile bootstrap intervals from per-image resampling within the
  subset (1000 resamples, seed 0; `--bootstrap N`, `--seed S`) for `accuracy`, `f1_macro`, `dice`, `iou`.
  Shown as `99.30 [98.80, 99.70]`.
- **Threshold.** 0.5 unless `--threshold` or `--tune-threshold` (the best native per-image Dice on the
  validation split over 0.20, 0.25, ..., 0.80); `threshold` and `threshold_tuned` say which.
- **Calibration.** `calibration.ece`: expected calibration error, 15 equal-width bins of the predicted class's
  probability, sum over bins of (share of images) x |accuracy - mean confidence|; `calibration.nll`: mean
  negative log-likelihood; `calibration.bins`: the reliability diagram's data. `--calibrate` fits a softmax
  temperature on the validation split (`temperature`); it leaves the predicted class, hence accuracy, unchanged.
- **Breakdowns.** `breakdowns.plane` (ax/co/sa), `breakdowns.class` (accuracy = that class's recall, `f1` its
  F1) and `breakdowns.tumour_size` (terciles of the ground-truth tumour's share of the image area, tumour
  images only, bounds in `area_fraction`), each with accuracy, Dice, IoU and counts of the headline subset.
- Fitting (threshold, temperature) and scoring on the same split is refused.
"""

# Settings that change what a figure measures: rows that differ in them cannot share one table.
COMPARABLE_KEYS = ("split", "subset", "resolution")


def output_folder_name(split: str, subset: str = "leak_free", tta: bool = False, threshold: float = 0.5,
                       default_threshold: float = 0.5, tuned: bool = False, calibrated: bool = False,
                       checkpoint: str = "best", raw_weights: bool = False) -> str:
    """`test_<split>` for the default settings; every non-default setting adds a part, e.g.
    `test_test_tta`, `test_test_thr0.45`, `test_test_thr0.45-tuned`, `test_test_all_calibrated`,
    `test_test_last` (another checkpoint than best.pth), `test_test_raw` (--no-ema on a run with EMA weights)."""
    parts = [f"test_{split}"]
    if checkpoint != "best":
        parts.append(checkpoint)
    if raw_weights:
        parts.append("raw")
    if subset != "leak_free":
        parts.append(subset)
    if tta:
        parts.append("tta")
    if tuned or abs(threshold - default_threshold) > 1e-9:
        parts.append(f"thr{threshold:.2f}" + ("-tuned" if tuned else ""))
    if calibrated:
        parts.append("calibrated")
    return "_".join(parts)


def setting_of(metrics: dict) -> dict:
    """The settings a metrics.json was scored with. Files written before these keys existed scored every
    image (subset `all`) at the training resolution."""
    return {
        "split": metrics.get("split", "?"),
        "subset": metrics.get("headline_subset", "all"),
        "resolution": metrics.get("resolution", "train"),
        "threshold": metrics.get("threshold"),
        "threshold_tuned": bool(metrics.get("threshold_tuned", "threshold_tuning" in metrics)),
        "tta": bool(metrics.get("tta", False)),
        "calibrated": metrics.get("temperature") is not None,
    }


def setting_label(setting: dict) -> str:
    """One short line, e.g. `test, leak-free, native res., thr 0.50, no TTA`."""
    threshold = setting["threshold"]
    thr = "thr ?" if threshold is None else f"thr {threshold:.2f}" + (" tuned on val" if setting[
        "threshold_tuned"] else "")
    parts = [setting["split"], setting["subset"].replace("_", "-"), f"{setting['resolution']} res.", thr,
             "flip TTA" if setting["tta"] else "no TTA"]
    if setting["calibrated"]:
        parts.append("temperature-scaled")
    return ", ".join(parts)


def check_comparable(settings: Sequence[dict], names: Sequence[str]) -> None:
    """Raise ValueError naming the rows when they differ in split, subset or resolution."""
    for key in COMPARABLE_KEYS:
        values = {s[key] for s in settings}
        if len(values) > 1:
            which = ", ".join(f"{name}: {s[key]}" for name, s in zip(names, settings))
            raise ValueError(f"the results differ in {key} ({which}); figures of different {key}s are not "
                             f"comparable: score every run with the same test.py settings")
