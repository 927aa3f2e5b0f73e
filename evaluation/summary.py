"""The console summary of test.py: every figure for each subset side by side, with 95 % intervals."""
from __future__ import annotations

import math
from typing import Optional

from evaluation.subsets import SUBSET_LABELS, SUBSETS
from utils.tables import markdown_table

# The headline figures of every comparison table (README results, shift benchmark, sweep, cv): (key, label).
HEADLINE_FIGURES = (("accuracy", "Accuracy"), ("f1_macro", "Macro-F1"), ("dice", "Dice"), ("iou", "IoU"))

# Figures in pixels (boundary distances; mm with a pixel spacing), printed as they are rather than as percentages.
PIXEL_KEYS = ("hd95", "assd")

# Rows of the printed summary: (key in the metric dict, label, what it averages over).
SUMMARY_ROWS = [
    ("accuracy", "Accuracy", "all images"),
    ("precision_macro", "Precision (macro)", "mean over classes present"),
    ("recall_macro", "Recall (macro)", "mean over classes present"),
    ("f1_macro", "F1 (macro)", "mean over classes present"),
    ("f1_weighted", "F1 (weighted)", "classes weighted by support"),
    ("dice", "Dice (tumour, per image)", "mean over images with tumour, native size"),
    ("iou", "IoU (tumour, per image)", "mean over images with tumour, native size"),
    ("dice_global", "Dice (tumour, global)", "summed TP/FP/FN, native size"),
    ("iou_global", "IoU (tumour, global)", "summed TP/FP/FN, native size"),
    ("dice_2class", "Dice (2-class mean)", "background and tumour, global, native size"),
    ("miou_2class", "mIoU (2-class mean)", "background and tumour, global, native size"),
    ("dice_all_images", "Dice (all images)", "per image, empty/empty = 1, native size"),
    ("sensitivity", "Sensitivity", "tumour pixels, global, native size"),
    ("specificity", "Specificity", "background pixels, global, native size"),
    ("pixel_accuracy", "Pixel accuracy", "all pixels, native size"),
    ("empty_fp_rate", "False-positive rate on empty masks", "images without tumour"),
    ("hd95", "HD95 (pixels)", "mean over images with tumour, native size"),
    ("assd", "ASSD (pixels)", "mean over images with tumour, native size"),
    ("contradiction_rate", "Class-mask contradictions", "no_tumor with a mask, or a tumour class without one"),
    ("dice_train_res", "Dice (tumour, per image), training res.", "mean over images with tumour"),
    ("iou_train_res", "IoU (tumour, per image), training res.", "mean over images with tumour"),
    ("balanced_accuracy", "Balanced accuracy", "mean recall over the labels in the truth"),
    ("detection_sensitivity", "Tumour detection sensitivity", "images with tumour (mapped labels)"),
    ("detection_specificity", "Tumour detection specificity", "images without tumour (mapped labels)"),
    ("detection_auc", "Tumour detection ROC AUC", "summed tumour-label probability"),
    ("out_of_set_rate", "Predicted labels not in the dataset", "all images"),
    ("num_images", "Images", "count"),
    ("num_tumour_images", "Images with tumour", "count"),
]
# Every figure key of a metrics.json, in the order of the summary (with the test loss).
FIGURE_KEYS = tuple(key for key, _, _ in SUMMARY_ROWS if not key.startswith("num_")) + ("loss",)


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A console table, columns padded (`utils.tables.markdown_table`)."""
    return markdown_table(header, rows, pad=True)


def format_value(key: str, figures: dict, interval: Optional[list] = None) -> str:
    """`99.30` for a fraction (percent), `99.30 [98.80, 99.70]` with its interval, counts as integers."""
    value = figures.get(key)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key.startswith("num_"):
        return str(int(value))
    if key == "loss":
        return f"{value:.4f}"
    if key in PIXEL_KEYS:
        return f"{value:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
    shown = f"{100 * value:.2f}"
    return f"{shown} [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]" if interval else shown


AGGREGATES = ("macro", "weighted")


def class_rows(figures: dict) -> list[tuple[str, str, str]]:
    """Summary rows per class (or mapped label): recall, F1 and, where masks are scored, tumour Dice."""
    names = [key[len("recall_"):] for key in figures
             if key.startswith("recall_") and key[len("recall_"):] not in AGGREGATES]
    rows = []
    for name in names:
        rows += [(f"recall_{name}", f"Recall {name}", f"images of class {name}"),
                 (f"f1_{name}", f"F1 {name}", f"class {name}"),
                 (f"dice_{name}", f"Dice {name} (per image)", f"tumour images of class {name}, native size")]
    return rows


def summary_table(subsets: dict[str, dict], headline: str, distance_unit: str = "px") -> str:
    """One column per subset present (all, leak-free, leaked), the headline subset marked with `*`; HD95 and
    ASSD are labelled in `distance_unit` (px, or mm with a pixel spacing). Per-class rows come before the
    counts."""
    names = [name for name in SUBSETS if name in subsets]
    header = ("metric", *[SUBSET_LABELS[n] + (" *" if n == headline else "") for n in names], "averaged over")
    figures = [row for row in SUMMARY_ROWS if not row[0].startswith("num_")]
    counts = [row for row in SUMMARY_ROWS if row[0].startswith("num_")]
    rows = []
    every = {key: value for n in names for key, value in subsets[n].items()}
    for key, label, over in figures + class_rows(every) + counts:
        if not any(isinstance(subsets[n].get(key), (int, float)) for n in names):
            continue
        cells = [format_value(key, subsets[n], (subsets[n].get("ci95") or {}).get(key))
                 + (" [degenerate]" if key in (subsets[n].get("ci95") or {}).get("degenerate", ()) else "")
                 for n in names]
        rows.append((label.replace("(pixels)", "(mm)") if distance_unit == "mm" else label, *cells, over))
    return format_table(rows, header)


def print_summary(results: dict, bootstrap: bool) -> None:
    """The leak check, the side-by-side subset table and the calibration line of a results dict."""
    headline, leak_info = results["headline_subset"], results["leak_check"]
    if leak_info.get("applied"):
        kinds = f"; {leak_info['num_exact']} identical, {leak_info['num_near']} near-identical" \
            if "num_exact" in leak_info else ""
        print(f"leak check against {leak_info['against']}: {leak_info['num_leaked']} of "
              f"{results['subsets']['all']['num_images']} images share content with training images{kinds} "
              "(listed in metrics.json)")
    ci = results["subsets"][headline].get("ci95") or {}
    resampled = (f", resampling {ci['num_groups']} scan groups of {ci['num_images']} images"
                 if ci.get("num_groups") and ci.get("num_groups") != ci.get("num_images") else "")
    role = f"{results['split']} split ({results['split_role']}); " if results.get("split_role") else ""
    print(f"{role}headline subset (top level of metrics.json): {SUBSET_LABELS[headline]} (marked *)"
          + (f"; [95 % interval: Clopper-Pearson for proportions, BCa bootstrap otherwise{resampled}; "
             "ci95.methods in metrics.json]" if bootstrap else ""))
    print(summary_table(results["subsets"], headline, results.get("distance_unit", "px")))
    gating = results["subsets"][headline].get("mask_gating")
    if gating:
        ungated, gated = gating["ungated"], gating["gated"]
        print(f"class-mask agreement ({SUBSET_LABELS[headline]}): masks {'gated' if gating['applied'] else 'not gated'}"
              f" (eval.gate_masks / --gate-masks); contradiction rate {_pct(ungated['contradiction_rate'])} without "
              f"gating, {_pct(gated['contradiction_rate'])} with; empty-mask false positives "
              f"{_pct(ungated['empty_fp_rate'])} / {_pct(gated['empty_fp_rate'])}; Dice {_pct(ungated['dice'])} / "
              f"{_pct(gated['dice'])}")
    calibration, temperature = results["calibration"], results["temperature"]
    if calibration is None:  # a segmentation-only run
        return
    print(f"calibration ({SUBSET_LABELS[headline]}): ECE {100 * calibration['ece']:.2f} %, NLL "
          f"{calibration['nll']:.4f}" + (f" at temperature {temperature:.3f} (uncalibrated ECE "
                                         f"{100 * calibration['ece_uncalibrated']:.2f} %)" if temperature else ""))


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"
