"""Is model B better than model A on the same images? A paired comparison of two test.py results.

    python -m evaluation.compare RUN_OR_METRICS_A RUN_OR_METRICS_B [--subset leak_free] [--split test] [--out DIR]

Each argument is a run directory (its `test_<split>` folder is used), a test.py output folder, or its
metrics.json; the per_image.csv beside it holds the per-image results. Both must score the same images with the
same conventions (split, resolution, threshold, TTA, mask gating, leak check): anything else is refused.

Per figure: A, B, the difference B - A with a 95 % paired BCa bootstrap interval (the same resampled images, or
whole scans when per_image.csv has a `scan_group` column, for both models, seeded), a p-value and its Holm
adjustment over every test of the comparison (the figures and each shortcut subgroup's); with scan groups the
p-value is a cluster sign-flip permutation test (whole scans flipped) instead of the tests below. Otherwise: McNemar's exact test for accuracy (a two-sided binomial test on the images
exactly one model classifies correctly), the Wilcoxon signed-rank test for per-image Dice, IoU, HD95 and ASSD
(tumour images; HD95 / ASSD where the ground truth has a tumour). A p-value is the probability of a difference
at least this large if both models were equally good on images like these; it says nothing about images from
another source. Writes compare.json and paired_dice.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import stats

from evaluation.stats import (bca_interval, dense_groups, holm, is_degenerate, jackknife_weights, resample_weights,
                               sign_flip_test)
from evaluation.subgroups import PROXIES, memberships
from evaluation.per_image import read_per_image_csv
from evaluation.summary import format_table
from utils.cli import add_debug_flag, positive_int, run_main
from utils.config import ConfigError
from utils.runs import write_json_atomic

# (figure, per_image.csv column, test, lower is better)
FIGURES = (("accuracy", "correct", "McNemar exact", False), ("dice", "dice", "Wilcoxon", False),
           ("iou", "iou", "Wilcoxon", False), ("hd95", "hd95", "Wilcoxon", True),
           ("assd", "assd", "Wilcoxon", True))
# metrics.json keys that must agree for the two results to be comparable.
CONVENTION_KEYS = ("split", "resolution", "tta", "gate_masks")


def locate(argument: Path, split: str) -> Path:
    """The test.py output folder that `argument` names (a metrics.json, such a folder, or a run directory)."""
    path = Path(argument)
    if path.is_file() and path.name == "metrics.json":
        path = path.parent
    elif path.is_dir() and not (path / "metrics.json").is_file():
        path = path / f"test_{split}"
    if not (path / "metrics.json").is_file():
        raise ConfigError(f"{argument}: no metrics.json found (looked in {path}); run test.py --checkpoint "
                          f"RUN/best.pth --split {split} first, or give the test.py output folder")
    if not (path / "per_image.csv").is_file():
        raise ConfigError(f"{path}: no per_image.csv (written by an older test.py); score the run again with test.py")
    return path


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test: the discordant pairs under H0 are Binomial(n, 1/2) (scipy's binomtest)."""
    a_only = int((correct_a & ~correct_b).sum())
    b_only = int((~correct_a & correct_b).sum())
    p = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only_correct": a_only, "b_only_correct": b_only, "p_value": p}


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired values; 1 when every pair is equal."""
    if len(a) == 0:
        return float("nan")
    if np.all(a == b):
        return 1.0
    return float(stats.wilcoxon(b, a).pvalue)


def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int, seed: int, level: float = 0.95,
                    groups: Optional[np.ndarray] = None) -> Optional[list]:
    """BCa interval of mean(b - a), resampling images (or whole scan `groups`) with replacement, the same draws
    for both models; None when every resample is equal (degenerate: no interval, not a zero-width one)."""
    if len(a) == 0 or resamples == 0:
        return [float("nan"), float("nan")]
    difference = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    group = dense_groups(groups, len(difference))
    weights = resample_weights(group, resamples, seed)
    means = weights @ difference / weights.sum(1)
    if is_degenerate(means):
        return None
    jack = jackknife_weights(group)
    return bca_interval(float(difference.mean()), means, jack @ difference / np.maximum(jack.sum(1), 1e-12), level)


def paired_test(a: np.ndarray, b: np.ndarray, test: str, groups: Optional[np.ndarray], seed: int) -> dict:
    """The p-value of one figure. Every image its own scan: McNemar exact (accuracy) or Wilcoxon. Images
    grouped into scans: a cluster sign-flip permutation test of the mean difference (whole scans flipped), which
    stays valid when slices of one scan are dependent; the test's name says which was used."""
    if groups is not None and len(np.unique(groups)) < len(a):
        return {"p_value": sign_flip_test(b.astype(np.float64) - a.astype(np.float64), groups, seed=seed),
                "test": "cluster sign-flip (scan groups)"}
    if test.startswith("McNemar"):
        return {**mcnemar_exact(a.astype(bool), b.astype(bool)), "test": test}
    return {"p_value": wilcoxon_p(a, b), "test": test}


def _rows_of(folder: Path, subset: str) -> dict[str, dict]:
    rows = read_per_image_csv(folder / "per_image.csv")
    if subset != "all" and not any(row["subset"] == subset for row in rows):
        if all(row["subset"] == "all" for row in rows):
            raise ConfigError(f"{folder}: scored without a leak check, so there is no '{subset}' subset; "
                              "compare with --subset all")
    return {row["stem"]: row for row in rows if subset == "all" or row["subset"] == subset}


def check_same(meta: list[dict], rows: list[dict[str, dict]], folders: list[Path], subset: str) -> None:
    """Refuse two results scored on different images, ground truth or conventions."""
    a, b = meta
    for key in CONVENTION_KEYS:
        if a.get(key) != b.get(key):
            raise ConfigError(f"the results differ in {key} ({folders[0]}: {a.get(key)}, {folders[1]}: {b.get(key)})"
                              f"; score both with the same test.py settings before comparing")
    masks_in_both = a.get("threshold") is not None and b.get("threshold") is not None  # None: no masks scored
    if masks_in_both and (a.get("threshold_tuned") != b.get("threshold_tuned") or (
            not a.get("threshold_tuned") and a.get("threshold") != b.get("threshold"))):
        raise ConfigError(f"the results differ in threshold ({folders[0]}: {a.get('threshold')}, tuned "
                          f"{a.get('threshold_tuned')}; {folders[1]}: {b.get('threshold')}, tuned "
                          f"{b.get('threshold_tuned')}); use the same --threshold, or --tune-threshold for both")
    stems_a, stems_b = set(rows[0]), set(rows[1])
    if stems_a != stems_b:
        raise ConfigError(f"the results score different images in subset '{subset}' ({len(stems_a)} in "
                          f"{folders[0]}, {len(stems_b)} in {folders[1]}, {len(stems_a & stems_b)} shared); "
                          "a paired comparison needs the same images: same data root, split and leak check")
    everything = [read_per_image_csv(folder / "per_image.csv") for folder in folders]
    subsets = [{row["stem"]: row["subset"] for row in table} for table in everything]
    if subsets[0] != subsets[1]:
        raise ConfigError("the results put different images in the leak-free / leaked subsets (different leak "
                          "checks or training splits); compare with --subset all, or score with the same split")
    for stem in sorted(stems_a):
        for column in ("true_class", "true_label", "true_area"):  # true_label: another dataset's label space
            values = rows[0][stem].get(column), rows[1][stem].get(column)
            if None in values:  # one of the two runs has no such task (e.g. classification only): not compared
                continue
            if values[0] != values[1]:
                raise ConfigError(f"image '{stem}' has a different {column} in the two results "
                                  f"({values[0]} vs {values[1]}): different ground truth")


def compare(folders: list[Path], subset: str, resamples: int = 1000, seed: int = 0) -> dict:
    """The comparison of two test.py output folders (A, B) as a dict (see the module docstring)."""
    import json

    meta = [json.loads((folder / "metrics.json").read_text(encoding="utf-8")) for folder in folders]
    rows = [_rows_of(folder, subset) for folder in folders]
    check_same(meta, rows, folders, subset)
    stems = sorted(rows[0])
    if not stems:
        raise ConfigError(f"subset '{subset}' holds no image in {folders[0]}")
    out: dict = {"a": str(folders[0]), "b": str(folders[1]), "subset": subset, "num_images": len(stems),
                 "settings": {key: meta[0].get(key) for key in (*CONVENTION_KEYS, "threshold", "threshold_tuned")},
                 "models": [m.get("model") for m in meta], "bootstrap": {"resamples": resamples, "seed": seed,
                                                                          "level": 0.95}, "figures": {}}
    groups = scan_groups_of(rows[0], stems)
    out["num_groups"] = len(np.unique(groups)) if groups is not None else len(stems)
    out["resampling"] = "scan groups (per_image.csv scan_group)" if groups is not None else "images"
    out["figures"] = paired_figures(rows, stems, groups, resamples, seed)
    out["subgroups"] = subgroup_comparisons(rows, stems, groups, resamples, seed)
    adjust_holm(out)
    if "dice" in out["figures"]:
        tumour = [s for s in stems if (rows[0][s]["true_area"] or 0) > 0 and rows[0][s]["dice"] is not None]
        out["_paired_dice"] = (np.array([rows[0][s]["dice"] for s in tumour]),
                               np.array([rows[1][s]["dice"] for s in tumour]))
    return out


def scan_groups_of(rows: dict[str, dict], stems: list[str]) -> Optional[np.ndarray]:
    """The scan group of each image from per_image.csv's `scan_group` column; None without one."""
    if not stems or rows[stems[0]].get("scan_group") is None:
        return None
    return np.array([rows[s]["scan_group"] for s in stems], dtype=np.int64)


def paired_figures(rows: list[dict[str, dict]], stems: list[str], groups: Optional[np.ndarray], resamples: int,
                   seed: int) -> dict:
    """Each figure of `FIGURES` for A and B on `stems`, its difference with an interval and a p-value."""
    out = {}
    for name, column, test, lower_better in FIGURES:
        values = [[rows[k][s].get(column) for s in stems] for k in (0, 1)]
        keep = [i for i in range(len(stems)) if values[0][i] is not None and values[1][i] is not None]
        if name != "accuracy":  # segmentation figures: tumour images only, as in metrics.json
            keep = [i for i in keep if (rows[0][stems[i]]["true_area"] or 0) > 0]
        a = np.array([values[0][i] for i in keep], dtype=np.float64)
        b = np.array([values[1][i] for i in keep], dtype=np.float64)
        if not len(a):
            continue
        kept_groups = None if groups is None else groups[keep]
        figure = {"a": float(a.mean()), "b": float(b.mean()), "difference": float(b.mean() - a.mean()),
                  "ci95": paired_interval(a, b, resamples, seed, groups=kept_groups), "num_images": len(a),
                  "num_groups": len(a) if kept_groups is None else len(np.unique(kept_groups)),
                  "lower_is_better": lower_better}
        figure.update(paired_test(a, b, test, kept_groups, seed))
        out[name] = figure
    return out


def subgroup_comparisons(rows: list[dict[str, dict]], stems: list[str], groups: Optional[np.ndarray],
                         resamples: int, seed: int) -> dict:
    """`paired_figures` per shortcut subgroup (evaluation.subgroups: shape, storage, size tercile of the files);
    storage only where per_image.csv has the `channels` column."""
    first = [rows[0][s] for s in stems]
    width = np.array([np.nan if r.get("width") is None else r["width"] for r in first], dtype=np.float64)
    height = np.array([np.nan if r.get("height") is None else r["height"] for r in first], dtype=np.float64)
    if not np.isfinite(width).any():
        return {}
    channels = np.array([r["channels"] for r in first]) if first[0].get("channels") is not None else None
    from evaluation.subgroups import size_cuts

    out: dict = {}
    for proxy, members in memberships(width, height, channels, size_cuts(width, height)).items():
        for name in PROXIES[proxy]:
            chosen = np.flatnonzero(members[name])
            if len(chosen):
                out[f"{proxy}:{name}"] = paired_figures(rows, [stems[i] for i in chosen],
                                                        None if groups is None else groups[chosen], resamples, seed)
    return out


def adjust_holm(result: dict) -> None:
    """Holm-adjusted p-values (`p_holm`) over every test of the result: the headline figures and each
    subgroup's, one family."""
    family = [f for f in result["figures"].values()] + [f for group in result.get("subgroups", {}).values()
                                                          for f in group.values()]
    for figure, adjusted in zip(family, holm([f.get("p_value", float("nan")) for f in family])):
        figure["p_holm"] = adjusted


def comparison_table(result: dict) -> str:
    """Figure | A | B | B - A [95 % interval] | p (test); fractions as percentages, distances in pixels."""
    table = []
    for name, f in result["figures"].items():
        scale, unit = (1.0, " px") if name in ("hd95", "assd") else (100.0, "")
        interval = " [degenerate]" if f["ci95"] is None else \
            f" [{scale * f['ci95'][0]:+.2f}, {scale * f['ci95'][1]:+.2f}]"
        table.append((name, f"{scale * f['a']:.2f}{unit}", f"{scale * f['b']:.2f}{unit}",
                      f"{scale * f['difference']:+.2f}{interval}", f"{f['p_value']:.3g} ({f['test']})",
                      f"{f.get('p_holm', float('nan')):.3g}", f"{f['num_images']} ({f.get('num_groups', '?')})"))
    return format_table(table, ("figure", "A", "B", "B - A [95 % CI]", "p (test)", "p Holm", "images (scans)"))


def subgroup_table(result: dict) -> str:
    """Accuracy and Dice differences per shortcut subgroup, with Holm-adjusted p-values."""
    table = []
    for group, figures in result.get("subgroups", {}).items():
        for name in ("accuracy", "dice"):
            if name in figures:
                f = figures[name]
                table.append((group, name, f"{100 * f['difference']:+.2f}", f"{f['p_value']:.3g}",
                              f"{f['p_holm']:.3g}", str(f["num_images"])))
    return format_table(table, ("subgroup", "figure", "B - A", "p", "p Holm", "images")) if table else ""


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Paired comparison of two test.py results on the same images")
    parser.add_argument("a", type=Path, help="run directory, test.py output folder or metrics.json of model A")
    parser.add_argument("b", type=Path, help="the same for model B")
    parser.add_argument("--subset", default="leak_free", choices=["leak_free", "all", "leaked"])
    parser.add_argument("--split", default="test", help="the split folder to use when given run directories")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ./compare_<A>_vs_<B>)")
    parser.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N",
                        help="paired-bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    from visualization.compare import save_paired_dice

    folders = [locate(args.a, args.split), locate(args.b, args.split)]
    result = compare(folders, args.subset, args.bootstrap, args.seed)
    # Run directories are `<work_dir>/<experiment>/<time stamp>` (reached through `latest`): name the experiment.
    runs = [folder.resolve().parent for folder in folders]
    names = [f"{run.parent.name}/{folder.name}" for run, folder in zip(runs, folders)]
    out_dir = args.out or Path(f"compare_{runs[0].parent.name}_vs_{runs[1].parent.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paired = result.pop("_paired_dice", None)
    write_json_atomic(result, out_dir / "compare.json")
    if paired is not None:
        save_paired_dice(*paired, names[0], names[1], f"per-image Dice, {args.subset} subset, "
                         f"{len(paired[0])} tumour images", out_dir / "paired_dice.png")
    print(f"A: {names[0]} ({result['models'][0]})\nB: {names[1]} ({result['models'][1]})\n"
          f"{result['num_images']} images, subset {args.subset}, split {result['settings']['split']}")
    print(comparison_table(result))
    if result.get("subgroups"):
        print("by shortcut subgroup (file shape, storage, size tercile; evaluation.subgroups):")
        print(subgroup_table(result))
    print("p: probability of a difference at least this large if A and B were equally good on such images "
          "(McNemar exact for accuracy, Wilcoxon signed-rank per image otherwise; a cluster sign-flip test when "
          "per_image.csv groups the images into scans); p Holm: adjusted over every test above (Holm)")
    print(f"results written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
