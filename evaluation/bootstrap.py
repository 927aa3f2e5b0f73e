"""95 % bootstrap confidence intervals by per-image resampling, vectorised over resamples.

A resample draws N images with replacement. Instead of materialising B resampled datasets, each resample is a
row of a (B, N) matrix of how often each image was drawn; every interval figure is then a linear function of
that matrix (accuracy, Dice and IoU are weighted means; the confusion matrices of all resamples are one matrix
product with the images' one-hot (label, prediction) cells), so 1000 images x 1000 resamples take milliseconds.
Intervals (see docs/statistics.md): Clopper–Pearson for proportions; BCa (bias-corrected, accelerated, with a
leave-one-group-out jackknife) for Dice, IoU, F1, HD95 and ASSD; resampling whole scan groups when given.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from evaluation.stats import (bca_interval, dense_groups, is_degenerate, jackknife_weights, proportion_interval,
                               resample_weights)
from evaluation.subsets import PerImage, contradictions, per_image_overlap, tumour_images

INTERVAL_METRICS = ("accuracy", "f1_macro", "dice", "iou", "hd95", "assd", "empty_fp_rate", "contradiction_rate")
_JACKKNIFE_ROWS = 512  # leave-one-group-out rows per chunk: keeps memory at 512 x N, not N x N
# per class, with class names: precision, recall and F1 of the class, and the tumour Dice of its images
CLASS_INTERVAL_METRICS = ("precision", "recall", "f1", "dice")


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float matrix: how often each image is drawn in each resample (rows sum to n)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need at least one image and one resample, got {n} images and {resamples} resamples")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def _resampled_classification(table: PerImage, index: np.ndarray, counts: np.ndarray, k: int,
                              class_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    if not table.has_cls:  # a segmentation-only run: no classification figure, hence no interval
        nothing = np.full(counts.shape[0], np.nan)
        return {"accuracy": nothing, "f1_macro": nothing}
    labels, preds = table.labels[index], table.preds[index]
    cells = np.zeros((len(index), k * k))
    cells[np.arange(len(index)), labels * k + preds] = 1.0
    confusion = (counts @ cells).reshape(-1, k, k)  # (B, K, K), rows: truth
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support, predicted = confusion.sum(2), confusion.sum(1)
    denominator = support + predicted
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)  # zero_division=0
    present = denominator > 0  # macro over the classes in the truth or the predictions, as evaluation.metrics
    f1_macro = (f1 * present).sum(1) / np.maximum(present.sum(1), 1)
    out = {"accuracy": tp.sum(1) / counts.sum(1), "f1_macro": f1_macro}
    with np.errstate(invalid="ignore", divide="ignore"):  # a class absent from a resample: NaN, left out
        for c, name in enumerate(class_names):
            out[f"precision_{name}"] = np.where(predicted[:, c] > 0, tp[:, c] / predicted[:, c], np.nan)
            out[f"recall_{name}"] = np.where(support[:, c] > 0, tp[:, c] / support[:, c], np.nan)
            out[f"f1_{name}"] = np.where(support[:, c] > 0, f1[:, c], np.nan)  # no F1 without the class
    return out


def resampled_figures(table: PerImage, index: np.ndarray, counts: np.ndarray, num_classes: int,
                      class_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1, tumour Dice and IoU (native resolution) of each resample: {name: (B,) array}; with
    `class_names`, also each class's precision, recall, F1 and tumour Dice (`recall_glioma`, `dice_glioma`, ...).

    `counts[b, j]` is how often image `index[j]` is drawn in resample b. Dice / IoU are NaN for a resample
    without a tumour image.
    """
    out = _resampled_classification(table, index, counts, num_classes, class_names)

    dice, iou = per_image_overlap(table.native[index])
    tumour = tumour_images(table, index).astype(np.float64)
    tumour_draws = counts @ tumour
    with np.errstate(invalid="ignore", divide="ignore"):
        out["dice"] = np.where(tumour_draws > 0, counts @ (dice * tumour) / tumour_draws, np.nan)
        out["iou"] = np.where(tumour_draws > 0, counts @ (iou * tumour) / tumour_draws, np.nan)
        if table.has_cls:
            for c, name in enumerate(class_names):
                of_class = tumour * (table.labels[index] == c)
                draws = counts @ of_class
                if of_class.any():
                    out[f"dice_{name}"] = np.where(draws > 0, counts @ (dice * of_class) / draws, np.nan)
        if table.distances is not None:  # HD95 / ASSD: mean over the images where they are defined
            distances = table.distances[index]
            defined = np.isfinite(distances[:, 0])
            weights = counts @ defined.astype(np.float64)
            for j, name in enumerate(("hd95", "assd")):
                values = np.where(defined, distances[:, j], 0.0)
                out[name] = np.where(weights > 0, counts @ values / weights, np.nan)
    return out


def _proportions(table: PerImage, index: np.ndarray, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-image success indicators of every proportion, over the images it counts (NaN: not a trial)."""
    out: dict[str, np.ndarray] = {}
    nan = np.nan
    if table.has_cls:
        labels, preds = table.labels[index], table.preds[index]
        correct = (labels == preds).astype(np.float64)
        out["accuracy"] = correct
        for c, name in enumerate(class_names):
            out[f"recall_{name}"] = np.where(labels == c, correct, nan)
            out[f"precision_{name}"] = np.where(preds == c, correct, nan)
    if table.has_seg:
        annotated = table.annotated[index]
        native = table.native[index]
        empty = annotated & ((native[:, 0] + native[:, 2]) == 0)
        out["empty_fp_rate"] = np.where(empty, (native[:, 1] > 0).astype(np.float64), nan)
        if table.has_cls and "no_tumor" in class_names:
            wrong = contradictions(table.preds[index], native, list(class_names).index("no_tumor"))
            out["contradiction_rate"] = np.where(annotated, wrong.astype(np.float64), nan)
    return out


def bootstrap_intervals(table: PerImage, index: np.ndarray, num_classes: int, resamples: int = 1000,
                        seed: int = 0, level: float = 0.95, class_names: Sequence[str] = (),
                        groups: Optional[np.ndarray] = None) -> dict:
    """{metric: [low, high] or None} for `INTERVAL_METRICS` on the images at `index` (and, with
    `class_names`, for `CLASS_INTERVAL_METRICS` of each class: `recall_glioma`, ...), plus the settings:
    `methods` {metric: interval method}, `degenerate` [metrics whose resamples are all equal: no interval,
    never a zero-width one], `num_images`, `num_groups`.

    Proportions (accuracy, per-class precision and recall, empty-mask and contradiction rates) get the exact
    Clopper–Pearson interval (on the effective number of trials when `groups` clusters the images); the other
    figures a BCa bootstrap that resamples whole groups. `groups`: a group (scan) id per image of `table`
    (aligned with it, not with `index`); None: every image its own group. A metric with no defined value
    (e.g. Dice on a subset without tumours) gets None.
    """
    index = np.asarray(index, dtype=np.int64)
    group = dense_groups(None if groups is None else np.asarray(groups)[index], len(index))
    info: dict = {"method": "Clopper-Pearson for proportions, BCa bootstrap for the rest"
                            + (", resampling scan groups" if groups is not None else ", per-image resampling"),
                  "level": level, "resamples": resamples, "seed": seed, "num_images": len(index),
                  "num_groups": int(group.max()) + 1 if len(index) else 0, "methods": {}, "degenerate": []}
    if len(index) == 0:
        return {**info, **{name: None for name in INTERVAL_METRICS}}
    clustered = None if groups is None else group
    proportions = _proportions(table, index, class_names)
    weights = resample_weights(group, resamples, seed)
    figures = resampled_figures(table, index, weights, num_classes, class_names)
    estimate = resampled_figures(table, index, np.ones((1, len(index))), num_classes, class_names)
    chunks = [resampled_figures(table, index, jackknife_weights(group, start, start + _JACKKNIFE_ROWS), num_classes,
                                class_names) for start in range(0, int(group.max()) + 1, _JACKKNIFE_ROWS)]
    jackknife = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}
    per_class = [f"{metric}_{name}" for name in class_names for metric in CLASS_INTERVAL_METRICS]
    for name in list(INTERVAL_METRICS) + per_class:
        if name in proportions:
            trials = np.isfinite(proportions[name])
            chosen = proportions[name][trials] > 0.5
            if not trials.any():
                info[name] = None
                continue
            info[name], info["methods"][name] = proportion_interval(
                chosen, None if clustered is None else clustered[trials], level)
        elif name in figures and np.isfinite(figures[name]).any():
            info["methods"][name] = "bca bootstrap" + (" (scan groups)" if clustered is not None else "")
            if is_degenerate(figures[name]):
                info[name] = None
                info["degenerate"].append(name)
                continue
            info[name] = bca_interval(float(estimate[name][0]), figures[name], jackknife[name], level)
        elif name in INTERVAL_METRICS:
            info[name] = None
    return info


def format_interval(interval: Optional[list], name: str, ci95: dict, scale: float = 100.0) -> str:
    """` [low, high]` for a console cell; ` [degenerate]` where every resample was equal; empty without one."""
    if name in (ci95 or {}).get("degenerate", ()):
        return " [degenerate]"
    if not interval:
        return ""
    return f" [{scale * interval[0]:.2f}, {scale * interval[1]:.2f}]"
