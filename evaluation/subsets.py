"""Every figure for any subset of an evaluated split, from one table of per-image records.

`PerImage` holds, per image: the true label, the class logits, the plane, whether it is annotated, and its
segmentation pixel counts at native resolution and at the training resolution. Every figure of
`evaluation.metrics` is a function of sums of these per-image numbers, so the figures of a subset (leak-free,
leaked, a plane, a class, a tumour-size tercile, a bootstrap resample) are the same functions of the same
counts restricted to that subset: `subset_figures(table, index)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from evaluation.metrics import classification_figures, segmentation_figures

SUBSETS = ("all", "leak_free", "leaked")
HEADLINE_SUBSETS = ("all", "leak_free")
SUBSET_LABELS = {"all": "all", "leak_free": "leak-free", "leaked": "leaked"}


@dataclass
class PerImage:
    """Per-image records of one evaluation, aligned by position (N images, K classes)."""

    stems: list[str]
    labels: np.ndarray  # (N,) int
    logits: Optional[np.ndarray]  # (N, K) class logits (log-probabilities under TTA); None: no class output
    planes: list[str]
    annotated: np.ndarray  # (N,) bool: the image takes part in the segmentation figures
    native: np.ndarray  # (N, 4) int TP, FP, FN, TN at the image's own size
    train_res: np.ndarray  # (N, 4) int TP, FP, FN, TN at the training resolution
    has_seg: bool = True  # False for a classification-only model: no segmentation figures
    distances: Optional[np.ndarray] = None  # (N, 2) HD95, ASSD at native size; NaN without a tumour in the truth
    sizes: Optional[np.ndarray] = None  # (N, 2) original height, width (NaN when unannotated)
    channels: Optional[np.ndarray] = None  # (N,) channels the file stores (1 grey, 3 colour; evaluation.subgroups)
    groups: Optional[np.ndarray] = None  # (N,) scan-group id (datasets.duplicates.scan_groups): cluster resampling

    @property
    def has_cls(self) -> bool:
        """False for a segmentation-only run: no classification figures."""
        return self.logits is not None

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(1)

    def __len__(self) -> int:
        return len(self.stems)


def per_image_overlap(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU from (N, 4) TP, FP, FN, TN; an empty truth with an empty prediction is 1."""
    tp, fp, fn = (counts[:, i].astype(np.float64) for i in range(3))
    union = tp + fp + fn
    safe = np.maximum(union, 1)
    dice = np.where(union > 0, 2 * tp / np.maximum(union + tp, 1), 1.0)
    iou = np.where(union > 0, tp / safe, 1.0)
    return dice, iou


def _segmentation(counts: np.ndarray, annotated: np.ndarray) -> dict:
    counts = counts[annotated]
    dice, iou = per_image_overlap(counts)
    tumour = (counts[:, 0] + counts[:, 2]) > 0
    empty = ~tumour
    images = [len(counts), int(tumour.sum()), int(empty.sum()), int((empty & (counts[:, 1] > 0)).sum())]
    overlap = [float(dice[tumour].sum()), float(iou[tumour].sum()), float(dice.sum()), float(iou.sum())]
    return segmentation_figures([int(v) for v in counts.sum(0)], images, overlap)


def subset_figures(table: PerImage, index: np.ndarray, class_names: Sequence[str]) -> dict:
    """Every figure of `evaluation.metrics` for the images at `index`; segmentation at native resolution, and
    the training-resolution figures under the same names with the suffix `_train_res`."""
    index = np.asarray(index, dtype=np.int64)
    results: dict = {}
    if table.has_cls:
        k = len(class_names)
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (table.labels[index], table.preds[index]), 1)
        results.update(classification_figures(confusion.tolist(), class_names))
    else:
        results["num_images"] = len(index)
    if not table.has_seg:
        return results
    annotated = table.annotated[index]
    results.update(_segmentation(table.native[index], annotated))
    for key, value in _segmentation(table.train_res[index], annotated).items():
        if not key.startswith("num_"):
            results[f"{key}_train_res"] = value
    if table.distances is not None:
        results.update(boundary_means(table.distances[index]))
    if table.has_cls:
        results.update(class_dice(table, index, class_names))
    if table.has_cls and "no_tumor" in class_names:
        results.update(agreement_figures(table.preds[index], table.native[index], annotated,
                                         class_names.index("no_tumor")))
    return results


def tumour_images(table: PerImage, index: np.ndarray) -> np.ndarray:
    """Which of the images at `index` have an annotated, non-empty tumour mask (the images tumour Dice averages
    over)."""
    native = table.native[index]
    return table.annotated[index] & ((native[:, 0] + native[:, 2]) > 0)


def class_dice(table: PerImage, index: np.ndarray, class_names: Sequence[str]) -> dict:
    """`dice_<class>`: tumour Dice per image (native size) averaged over the tumour images of each true class;
    classes without a tumour image in the subset (no_tumor) get no entry."""
    index = np.asarray(index, dtype=np.int64)
    dice, _ = per_image_overlap(table.native[index])
    tumour = tumour_images(table, index)
    labels = table.labels[index]
    of_class = [(name, tumour & (labels == k)) for k, name in enumerate(class_names)]
    return {f"dice_{name}": float(dice[chosen].mean()) for name, chosen in of_class if chosen.any()}


def boundary_means(distances: np.ndarray) -> dict:
    """Mean HD95 and ASSD (pixels) over the images where they are defined (tumour in the ground truth)."""
    defined = np.isfinite(distances[:, 0])
    if not defined.any():
        return {"hd95": None, "assd": None, "num_boundary_images": 0}
    return {"hd95": float(distances[defined, 0].mean()), "assd": float(distances[defined, 1].mean()),
            "num_boundary_images": int(defined.sum())}


def agreement_figures(preds: np.ndarray, native: np.ndarray, annotated: np.ndarray, no_tumour: int) -> dict:
    """Share of annotated images whose class and mask disagree: predicted no_tumor with a non-empty mask, or a
    tumour class with an empty mask (native size)."""
    contradiction = contradictions(preds, native, no_tumour)[annotated]
    says_none = preds[annotated] == no_tumour
    return {"contradiction_rate": float(contradiction.mean()) if len(contradiction) else None,
            "num_contradictions": int(contradiction.sum()),
            "num_mask_without_tumour_class": int((contradiction & says_none).sum()),
            "num_tumour_class_without_mask": int((contradiction & ~says_none).sum())}


def contradictions(preds: np.ndarray, native: np.ndarray, no_tumour: int) -> np.ndarray:
    """(N,) bool: the predicted class says no tumour and the mask has pixels, or the reverse."""
    mask_drawn = (native[:, 0] + native[:, 1]) > 0
    return (preds == no_tumour) == mask_drawn


def subset_indices(stems: Sequence[str], leaked: Optional[Mapping[str, Sequence[str]]]) -> dict[str, np.ndarray]:
    """Positions of the `all`, `leak_free` and `leaked` images; without a leak check only `all`."""
    everything = np.arange(len(stems))
    if leaked is None:
        return {"all": everything}
    is_leaked = np.array([stem in leaked for stem in stems], dtype=bool)
    return {"all": everything, "leak_free": everything[~is_leaked], "leaked": everything[is_leaked]}


def excluded_list(leaked: Mapping[str, Sequence[str]], stems: Sequence[str], against: str) -> list[dict]:
    """The leaked images of this split, each with the training images it matches and why it is excluded."""
    present = set(stems)
    return [{"stem": stem, "matches": sorted(matches),
             "reason": f"identical or near-identical pixels to {len(matches)} image(s) of {against}"}
            for stem, matches in sorted(leaked.items()) if stem in present]
