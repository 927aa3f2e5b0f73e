"""per_image.csv: one row per scored image, from which every aggregate of metrics.json can be recomputed.

Columns: stem, subset (`leak_free` / `leaked`; `all` when no leak check applies), plane, true_class,
pred_class, correct, prob_<class> (softmax, temperature-scaled when `--calibrate`), dice, iou, hd95, assd
(native size, as scored: gated when `gate_masks` is on), true_area and pred_area (pixels at native size),
width, height (original size), dice_train_res, iou_train_res; channels (1 / 3: the file's storage) and
scan_group (datasets.duplicates.scan_groups) when the scorer knows them. Segmentation cells are empty for an image
without an annotation; hd95 / assd are empty when the ground truth is empty (see metric_definitions.md).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from evaluation.subsets import PerImage, per_image_overlap


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(1, keepdims=True)


def _cell(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def per_image_rows(table: PerImage, subset_of: dict[str, str], class_names: Sequence[str],
                   temperature: float = 1.0) -> list[dict]:
    """The rows of per_image.csv; `subset_of` maps a stem to `leak_free` / `leaked` (missing: `all`)."""
    probs = _softmax(table.logits / temperature) if table.has_cls else None
    preds = table.preds if table.has_cls else None
    dice, iou = per_image_overlap(table.native)
    dice_tr, iou_tr = per_image_overlap(table.train_res)
    rows = []
    for n, stem in enumerate(table.stems):
        annotated = bool(table.annotated[n]) and table.has_seg
        tp, fp, fn, _ = (int(v) for v in table.native[n])
        row = {"stem": stem, "subset": subset_of.get(stem, "all"), "plane": table.planes[n]}
        if table.has_cls:  # a segmentation-only run has no class columns
            row.update({"true_class": class_names[table.labels[n]], "pred_class": class_names[preds[n]],
                        "correct": int(table.labels[n] == preds[n])})
            row.update({f"prob_{name}": float(probs[n, k]) for k, name in enumerate(class_names)})
        distances = table.distances[n] if table.distances is not None and annotated else (math.nan, math.nan)
        sizes = table.sizes[n] if table.sizes is not None else (math.nan, math.nan)
        row.update({"dice": float(dice[n]) if annotated else None, "iou": float(iou[n]) if annotated else None,
                    "hd95": _cell(distances[0]), "assd": _cell(distances[1]),
                    "true_area": tp + fn if annotated else None, "pred_area": tp + fp if annotated else None,
                    "width": None if not math.isfinite(sizes[1]) else int(sizes[1]),
                    "height": None if not math.isfinite(sizes[0]) else int(sizes[0]),
                    "dice_train_res": float(dice_tr[n]) if annotated else None,
                    "iou_train_res": float(iou_tr[n]) if annotated else None})
        if table.channels is not None:  # file storage (evaluation.subgroups) and scan group, when known
            row["channels"] = int(table.channels[n])
        if table.groups is not None:
            row["scan_group"] = int(table.groups[n])
        rows.append(row)
    return rows


def write_per_image_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_per_image_csv(path: Path) -> list[dict]:
    """Rows of a per_image.csv with numbers parsed (empty cells: None)."""
    text_columns = {"stem", "subset", "plane", "true_class", "pred_class", "true_label", "pred_label"}  # label space: another dataset
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [{key: value if key in text_columns else (None if value == "" else float(value))
             for key, value in row.items()} for row in rows]
