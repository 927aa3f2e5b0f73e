"""How much wider the 95 % intervals of a test.py result get when slices of one scan are resampled together.

    python scripts/interval_widening.py runs/brisc_cpu/latest/test_val [--subset leak_free]

Reads the folder's per_image.csv (its `scan_group` column, written by test.py) and prints, for accuracy
(Clopper–Pearson; with scan groups on the effective number of trials) and per-image tumour Dice (BCa bootstrap,
resampling images or whole scan groups), the interval treating every slice as independent beside the
scan-level one, and the ratio of their widths.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from evaluation.per_image import read_per_image_csv  # noqa: E402
from evaluation.stats import bca_interval, dense_groups, jackknife_weights, proportion_interval, resample_weights
from utils.cli import add_debug_flag, positive_int, run_main
from utils.errors import InputError


def mean_interval(values: np.ndarray, groups: Optional[np.ndarray], resamples: int, seed: int) -> Optional[list]:
    """BCa interval of the mean of `values`, resampling `groups` (None: every value its own group)."""
    dense = dense_groups(groups, len(values))
    weights = resample_weights(dense, resamples, seed)
    jack = jackknife_weights(dense)
    return bca_interval(float(values.mean()), weights @ values / weights.sum(1), jack @ values / jack.sum(1))


def widening(rows: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """{figure: {"images": [lo, hi], "scans": [lo, hi], "ratio": width_scans / width_images}} and the counts."""
    groups = np.array([row["scan_group"] for row in rows], dtype=np.int64)
    out: dict = {"num_images": len(rows), "num_groups": int(len(np.unique(groups)))}
    correct = np.array([row["correct"] for row in rows if row.get("correct") is not None], dtype=bool)
    tumour = [(row["dice"], g) for row, g in zip(rows, groups) if (row.get("true_area") or 0) > 0
              and row.get("dice") is not None]
    figures = {}
    if len(correct) == len(rows):
        figures["accuracy"] = (proportion_interval(correct)[0], proportion_interval(correct, groups)[0])
    if tumour:
        dice = np.array([d for d, _ in tumour], dtype=np.float64)
        dice_groups = np.array([g for _, g in tumour])
        figures["dice"] = (mean_interval(dice, None, resamples, seed), mean_interval(dice, dice_groups, resamples, seed))
    for name, (images, scans) in figures.items():
        ratio = (scans[1] - scans[0]) / (images[1] - images[0]) if images and scans and images[1] > images[0] else None
        out[name] = {"images": images, "scans": scans, "ratio": ratio}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a test.py output folder (holding per_image.csv)")
    parser.add_argument("--subset", default="leak_free", choices=["leak_free", "all"])
    parser.add_argument("--resamples", type=positive_int, default=2000)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    path = args.folder / "per_image.csv"
    if not path.is_file():
        raise InputError(f"{path} does not exist: give a test.py output folder")
    rows = [r for r in read_per_image_csv(path) if args.subset == "all" or r.get("subset") in (None, "leak_free")]
    if not rows or rows[0].get("scan_group") is None:
        raise InputError(f"{path} has no scan_group column (written by an older test.py): score the run again")
    result = widening(rows, args.resamples)
    print(f"{args.folder} ({args.subset}): {result['num_images']} images in {result['num_groups']} scan groups")
    for name in ("accuracy", "dice"):
        if name in result:
            r = result[name]
            print(f"{name}: per image [{100 * r['images'][0]:.2f}, {100 * r['images'][1]:.2f}], per scan "
                  f"[{100 * r['scans'][0]:.2f}, {100 * r['scans'][1]:.2f}], width x{r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
