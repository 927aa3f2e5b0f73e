"""Shortcut subgroups: the headline figures broken down by source proxies of the FILE, with intervals.

BRISC 2025's classes differ in how their files are stored (issue 28): every glioma file is 512x512 while a
third of the no-tumour files are non-square, and every no-tumour file is stored with three channels. A model
that reads the storage instead of the anatomy scores differently on these subgroups:

- `shape`: `square` / `non_square` (width == height of the original file);
- `storage`: `1_channel` / `3_channel` (the channels the file stores, read from its header: `file_channels`);
- `size`: `small` / `medium` / `large`, terciles of the pixel count (width x height) over the scored images,
  cut at the 1/3 and 2/3 quantiles (`size_cuts`; ties go to the lower tercile, so a tercile may be empty).

`subgroup_breakdown` gives every figure of `evaluation.subsets.subset_figures` per subgroup (the headline ones
kept) with the intervals of `evaluation.bootstrap`; `figures_from_rows` recomputes them from per_image.csv
(the test checks they agree exactly).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from evaluation.bootstrap import bootstrap_intervals
from evaluation.subsets import PerImage, subset_figures

PROXIES = {"shape": ("square", "non_square"), "storage": ("1_channel", "3_channel"),
           "size": ("small", "medium", "large")}
SUBGROUP_KEYS = ("accuracy", "f1_macro", "dice", "iou", "hd95", "assd", "num_images", "num_tumour_images")


def file_channels(paths: Sequence[Union[str, Path]]) -> np.ndarray:
    """(N,) channels each image file stores, from its header (PIL; no decoding): 1 for grey, 3 for colour
    (an alpha band is not counted)."""
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as image:
            bands = [band for band in image.getbands() if band != "A"]
            out.append(3 if image.mode == "P" else len(bands))
    return np.array(out, dtype=np.int64)


def annotate_table(table: PerImage, image_paths: Sequence[Union[str, Path]],
                   group_ids: Optional[np.ndarray] = None) -> PerImage:
    """Set `table.channels` from the files' headers (aligned with `table.stems`) and `table.groups` to the scan
    group ids (datasets.duplicates.scan_group_ids of the same samples; None: per-image resampling). Returns
    the table, so scoring, per_image.csv and the subgroup breakdown all see them."""
    if len(image_paths) != len(table):
        raise ValueError(f"{len(image_paths)} image paths for {len(table)} scored images")
    table.channels = file_channels(image_paths)
    if group_ids is not None:
        if len(group_ids) != len(table):
            raise ValueError(f"{len(group_ids)} scan-group ids for {len(table)} scored images")
        table.groups = np.asarray(group_ids, dtype=np.int64)
    return table


def size_cuts(width: np.ndarray, height: np.ndarray) -> list[float]:
    """The 1/3 and 2/3 quantiles of the pixel count of the images with a known size."""
    area = (np.asarray(width, dtype=np.float64) * np.asarray(height, dtype=np.float64))
    area = area[np.isfinite(area)]
    return [float(v) for v in np.quantile(area, [1 / 3, 2 / 3])] if len(area) else [np.nan, np.nan]


def memberships(width: np.ndarray, height: np.ndarray, channels: Optional[np.ndarray],
                cuts: Sequence[float]) -> dict[str, dict[str, np.ndarray]]:
    """{proxy: {subgroup: (N,) bool}}; an image of unknown size or storage belongs to no subgroup of it."""
    width, height = np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64)
    known = np.isfinite(width) & np.isfinite(height)
    area = np.where(known, width * height, np.nan)
    out = {"shape": {"square": known & (width == height), "non_square": known & (width != height)},
           "size": {"small": known & (area <= cuts[0]), "medium": known & (area > cuts[0]) & (area <= cuts[1]),
                    "large": known & (area > cuts[1])}}
    if channels is not None:
        channels = np.asarray(channels)
        out["storage"] = {"1_channel": channels == 1, "3_channel": channels >= 3}
    return out


def subgroup_breakdown(table: PerImage, index: np.ndarray, class_names: Sequence[str], resamples: int = 1000,
                       seed: int = 0) -> dict:
    """{"size_cuts": [c1, c2] (pixels), "groups": {proxy: {subgroup: figures + ci95}}} for the images at
    `index` (the headline subset). Sizes come from `table.sizes`, storage from `table.channels` (omitted when
    None); intervals resample `table.groups` (scan groups) when set. A subgroup without images has
    `num_images` 0 and nothing else."""
    index = np.asarray(index, dtype=np.int64)
    if table.sizes is None:
        raise ValueError("subgroup_breakdown needs the images' original sizes (PerImage.sizes)")
    height, width = table.sizes[index, 0], table.sizes[index, 1]
    cuts = size_cuts(width, height)
    channels = None if table.channels is None else table.channels[index]
    out: dict = {"size_cuts": cuts, "groups": {}}
    for proxy, members in memberships(width, height, channels, cuts).items():
        out["groups"][proxy] = {}
        for name in PROXIES[proxy]:
            chosen = index[members[name]]
            if not len(chosen):
                out["groups"][proxy][name] = {"num_images": 0}
                continue
            figures = subset_figures(table, chosen, class_names)
            entry = {key: figures[key] for key in SUBGROUP_KEYS if key in figures}
            entry.update({key: value for key, value in figures.items() if key.startswith("recall_")
                          and key[len("recall_"):] in class_names})
            entry["ci95"] = bootstrap_intervals(table, chosen, len(class_names), resamples, seed,
                                                class_names=class_names, groups=table.groups) if resamples else None
            out["groups"][proxy][name] = entry
    return out


def figures_from_rows(rows: Sequence[dict], cuts: Sequence[float]) -> dict[str, dict[str, dict]]:
    """{proxy: {subgroup: accuracy, dice, iou, hd95, assd, num_images, recall_<class>}} recomputed from the rows
    of per_image.csv (evaluation.per_image.read_per_image_csv) with the breakdown's `size_cuts`."""
    width = np.array([np.nan if r.get("width") is None else r["width"] for r in rows], dtype=np.float64)
    height = np.array([np.nan if r.get("height") is None else r["height"] for r in rows], dtype=np.float64)
    channels = np.array([r["channels"] for r in rows]) if rows and "channels" in rows[0] else None
    out: dict = {}
    for proxy, members in memberships(width, height, channels, cuts).items():
        out[proxy] = {}
        for name in PROXIES[proxy]:
            chosen = [row for row, member in zip(rows, members[name]) if member]
            figures: dict = {"num_images": len(chosen)}
            if chosen and "correct" in chosen[0]:
                figures["accuracy"] = float(np.mean([row["correct"] for row in chosen]))
                for label in sorted({row["true_class"] for row in chosen}):
                    of = [row["correct"] for row in chosen if row["true_class"] == label]
                    figures[f"recall_{label}"] = float(np.mean(of))
            tumour = [row for row in chosen if (row.get("true_area") or 0) > 0]
            for key in ("dice", "iou"):
                if tumour:
                    figures[key] = float(np.mean([row[key] for row in tumour]))
            for key in ("hd95", "assd"):
                defined = [row[key] for row in chosen if row.get(key) is not None]
                if defined:
                    figures[key] = float(np.mean(defined))
            out[proxy][name] = figures
    return out
