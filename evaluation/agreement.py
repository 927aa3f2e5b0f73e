"""Class-mask agreement: gate the mask with the classifier, and report the segmentation figures both ways.

A multi-task model can say "no tumour" and still draw a mask, or name a tumour class and draw nothing: the
contradiction rate (`evaluation.subsets.agreement_figures`) counts those images. Gating empties the mask of
every image the classifier calls no_tumor: that removes the first kind by construction; the second kind (a
tumour class with an empty mask) is left as it is, since gating cannot draw a mask. The gated counts follow
from the ungated ones and the predicted class, so both are scored from one pass.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from evaluation.subsets import PerImage, subset_figures

# The figures that gating can change, reported under `mask_gating.gated` / `mask_gating.ungated` per subset.
GATED_KEYS = ("dice", "iou", "dice_global", "iou_global", "dice_all_images", "empty_fp_rate", "hd95", "assd",
              "contradiction_rate")


def _gate_counts(counts: np.ndarray, gated: np.ndarray) -> np.ndarray:
    """TP, FP, FN, TN of an empty prediction for the rows in `gated`: every true pixel missed."""
    out = counts.copy()
    tp, fp, fn, tn = (counts[gated, i] for i in range(4))
    out[gated] = np.stack([np.zeros_like(tp), np.zeros_like(fp), tp + fn, tn + fp], 1)
    return out


def gate_masks(table: PerImage, no_tumour: int) -> PerImage:
    """The same table with the mask of every image predicted `no_tumour` emptied (native and training
    resolution); HD95 / ASSD of a tumour image so emptied become the image diagonal (the empty-prediction
    convention of `evaluation.boundary`)."""
    gated = table.preds == no_tumour
    distances = table.distances
    if distances is not None:
        distances = distances.copy()
        tumour = gated & np.isfinite(distances[:, 0])
        if table.sizes is not None:
            distances[tumour] = np.hypot(table.sizes[tumour, 0], table.sizes[tumour, 1])[:, None]
    return dataclasses.replace(table, native=_gate_counts(table.native, gated),
                               train_res=_gate_counts(table.train_res, gated), distances=distances)


def gating_figures(ungated: PerImage, gated: PerImage, index: np.ndarray, class_names: Sequence[str],
                   applied: bool) -> dict:
    """{"applied": bool, "ungated": {...}, "gated": {...}} with the `GATED_KEYS` of the images at `index`."""
    out: dict = {"applied": applied}
    for name, table in (("ungated", ungated), ("gated", gated)):
        figures = subset_figures(table, index, class_names)
        out[name] = {key: figures.get(key) for key in GATED_KEYS}
    return out
