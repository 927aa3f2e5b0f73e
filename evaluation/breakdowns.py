"""The headline figures per imaging plane, per class and per tumour-size tercile of one subset.

Tumour size is the share of the image's own area covered by the ground-truth tumour (native resolution), so
images of different sizes compare; terciles are cut at the 1/3 and 2/3 quantiles of the tumour images of the
subset and hold only tumour images. Per class, `accuracy` is that class's recall and `f1` its F1 computed over
every image of the subset (its precision counts the other classes' images called this class: on the class's
own images alone F1 would be 2R / (1 + R) whatever the false positives).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from evaluation.subsets import PerImage, subset_figures

BREAKDOWN_KEYS = ("accuracy", "f1_macro", "dice", "iou", "dice_global", "dice_train_res", "num_images",
                  "num_tumour_images")
TERCILES = ("small", "medium", "large")


def _pick(figures: dict, keys: Sequence[str] = BREAKDOWN_KEYS) -> dict:
    return {key: figures[key] for key in keys if key in figures}


def tumour_fraction(table: PerImage) -> np.ndarray:
    """Ground-truth tumour pixels / image pixels at native size (0 for no tumour, NaN without annotation)."""
    native = table.native.astype(np.float64)
    area = native.sum(1)
    fraction = np.where(area > 0, (native[:, 0] + native[:, 2]) / np.maximum(area, 1), 0.0)
    return np.where(table.annotated, fraction, np.nan)


def breakdowns(table: PerImage, index: np.ndarray, class_names: Sequence[str], planes: Sequence[str]) -> dict:
    """{"plane": {plane: figures}, "class": {class: figures}, "tumour_size": {tercile: figures + bounds}}."""
    index = np.asarray(index, dtype=np.int64)
    whole = subset_figures(table, index, class_names) if len(index) else {}
    out: dict = {"plane": {}, "class": {}, "tumour_size": {}}
    plane_of = np.array(table.planes)[index] if len(index) else np.array([], dtype=str)
    for plane in planes:
        members = index[plane_of == plane]
        if len(members):
            out["plane"][plane] = _pick(subset_figures(table, members, class_names))
    for c, name in enumerate(class_names):
        members = index[table.labels[index] == c]
        if len(members):
            figures = subset_figures(table, members, class_names)
            keys = [key for key in BREAKDOWN_KEYS if key != "f1_macro"]  # one class: its own F1 instead
            out["class"][name] = {**_pick(figures, keys), "f1": whole.get(f"f1_{name}")}  # None: no cls
    fraction = tumour_fraction(table)[index]
    tumour = np.nan_to_num(fraction) > 0
    if tumour.sum() >= len(TERCILES):
        cuts = np.quantile(fraction[tumour], [1 / 3, 2 / 3])
        bounds = [0.0, float(cuts[0]), float(cuts[1]), 1.0]
        which = np.digitize(fraction[tumour], cuts, right=True)  # 0, 1, 2
        for t, name in enumerate(TERCILES):
            members = index[tumour][which == t]
            if len(members):
                out["tumour_size"][name] = {**_pick(subset_figures(table, members, class_names)),
                                            "area_fraction": [bounds[t], bounds[t + 1]]}
    return out
