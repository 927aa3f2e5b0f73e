"""What a set of test figures means: split, subset, resolution, threshold, TTA, calibration.

`test.py` writes these settings into metrics.json and into its output folder's name (so two runs with
different settings never overwrite each other), and every table built from metrics.json files (the README's
results, `benchmark.py --metrics`) names them per row and refuses to put figures of different conventions
side by side as if they were comparable.
"""
from __future__ import annotations

from typing import Sequence

# Settings that change what a figure measures: rows that differ in them cannot share one table.
COMPARABLE_KEYS = ("split", "subset", "resolution")


def output_folder_name(split: str, subset: str = "leak_free", tta: bool = False, threshold: float = 0.5,
                       default_threshold: float = 0.5, tuned: bool = False, calibrated: bool = False) -> str:
    """`test_<split>` for the default settings; every non-default setting adds a part, e.g.
    `test_test_tta`, `test_test_thr0.45`, `test_test_thr0.45-tuned`, `test_test_all_calibrated`."""
    parts = [f"test_{split}"]
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
