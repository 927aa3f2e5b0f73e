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
- **Intervals.** `ci95` (per subset; docs/statistics.md): exact Clopper–Pearson intervals for proportions
  (`accuracy`, per class `precision_<class>` and `recall_<class>`, `empty_fp_rate`, `contradiction_rate`) and
  BCa bootstrap intervals (1000 resamples, seed 0; `--bootstrap N`, `--seed S`) for `f1_macro`, `f1_<class>`,
  `dice`, `iou`, `dice_<class>` (tumour Dice per image over that true class's tumour images), `hd95`, `assd`.
  `ci95.methods` names the method of each figure; with scan groups the bootstrap draws whole groups and the
  exact interval uses the effective number of trials (`num_groups` beside `num_images`). A figure whose
  resamples are all equal is listed in `ci95.degenerate` with no interval (printed `[degenerate]`), never a
  zero-width one. Shown as `99.30 [98.80, 99.70]`. An absent figure (a class not in the subset) is `–`.
- **Boundary distances** (pixels at native size; millimetres when `data.layout.spacing` or `--spacing` gives the
  pixel spacing, `distance_unit` in metrics.json). The contour of a mask is its tumour pixels with a background
  4-neighbour (outside the image counts as background); distances are Euclidean between pixel centres. `hd95`:
  per image, the larger of the two directed 95th percentiles of contour-to-nearest-contour distances (predicted
  to true, true to predicted); `assd`: the mean of all those distances, both directions pooled; each averaged
  over images with a tumour in the ground truth (`num_boundary_images`). An empty prediction on a tumour image
  scores the image diagonal; an image with an empty ground truth has no distance (it is counted by
  `empty_fp_rate`). BRISC 2025 has no pixel spacing, so the unit is the pixel of the image's own size.
- **Class-mask agreement.** `contradiction_rate`: share of annotated images whose predicted class and mask
  disagree: `no_tumor` predicted with at least one mask pixel (`num_mask_without_tumour_class`), or a tumour
  class with an empty mask (`num_tumour_class_without_mask`). `gate_masks` (`eval.gate_masks`, `--gate-masks`;
  off by default) empties the mask of every image predicted `no_tumor` before scoring; `mask_gating.gated` and
  `mask_gating.ungated` (per subset) hold `dice`, `iou`, `dice_global`, `iou_global`, `dice_all_images`,
  `empty_fp_rate`, `hd95`, `assd` and `contradiction_rate` both ways, whichever is applied. Gating removes the
  first kind of contradiction and leaves the second (it cannot draw a mask).
- **Per image.** `per_image.csv`: one row per image (stem, subset, plane, true and predicted class, the four
  probabilities, `dice`, `iou`, `hd95`, `assd`, true and predicted tumour area in pixels, original width and
  height, training-resolution Dice / IoU), as scored (gated when `gate_masks` is on): every figure above can be
  recomputed from it.
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
                       checkpoint: str = "best", raw_weights: bool = False, gated: bool = False,
                       runtime: str = "torch", precision: str = "fp32") -> str:
    """`test_<split>` for the default settings; every non-default setting adds a part, e.g.
    `test_test_tta`, `test_test_thr0.45`, `test_test_thr0.45-tuned`, `test_test_all_calibrated`,
    `test_test_last` (another checkpoint than best.pth), `test_test_raw` (--no-ema on a run with EMA weights),
    `test_test_gated` (masks emptied where the classifier says no_tumor), `test_val_onnxruntime-int8-dynamic`
    (another runtime or precision than eager PyTorch in fp32, so a paired comparison keeps both folders)."""
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
    if gated:
        parts.append("gated")
    if (runtime, precision) != ("torch", "fp32"):
        parts.append(runtime if precision == "fp32" else f"{runtime}-{precision}")
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
        "gate_masks": bool(metrics.get("gate_masks", False)),
    }


def setting_label(setting: dict) -> str:
    """One short line, e.g. `test, leak-free, native res., thr 0.50, no TTA` (`, masks gated by class` when
    `gate_masks` was on: gated and ungated rows must not pass for one setting)."""
    threshold = setting["threshold"]
    thr = "thr ?" if threshold is None else f"thr {threshold:.2f}" + (" tuned on val" if setting[
        "threshold_tuned"] else "")
    parts = [setting["split"], setting["subset"].replace("_", "-"), f"{setting['resolution']} res.", thr,
             "flip TTA" if setting["tta"] else "no TTA"]
    if setting["calibrated"]:
        parts.append("temperature-scaled")
    if setting.get("gate_masks"):
        parts.append("masks gated by class")
    return ", ".join(parts)


def check_comparable(settings: Sequence[dict], names: Sequence[str]) -> None:
    """Raise ValueError naming the rows when they differ in split, subset or resolution."""
    for key in COMPARABLE_KEYS:
        values = {s[key] for s in settings}
        if len(values) > 1:
            which = ", ".join(f"{name}: {s[key]}" for name, s in zip(names, settings))
            raise ValueError(f"the results differ in {key} ({which}); figures of different {key}s are not "
                             f"comparable: score every run with the same test.py settings")
