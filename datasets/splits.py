"""Stratified train/validation split of the release's train folder, stored as a small JSON of file stems."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .errors import DataError


def make_split(stems: Sequence[str], labels: Sequence[int], val_fraction: float, seed: int) -> dict:
    """Per class, `round(n * val_fraction)` stems go to validation (at least one when the class has two or
    more images and the fraction is positive). The result depends only on the set of (stem, label) pairs,
    the fraction and the seed, not on the input order."""
    if len(stems) != len(labels):
        raise ValueError(f"{len(stems)} stems but {len(labels)} labels")
    if len(set(stems)) != len(stems):
        raise ValueError("stems must be unique")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for stem, label in sorted(zip(stems, labels)):
        by_class.setdefault(int(label), []).append(stem)
    val: list[str] = []
    for label in sorted(by_class):
        members = by_class[label]
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        order = rng.permutation(len(members))
        val.extend(members[j] for j in order[:n_val])
    val_set = set(val)
    return {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "train": sorted(s for s in stems if s not in val_set),
        "val": sorted(val_set),
    }


def save_split(split: dict, path: Union[str, Path]) -> None:
    """Write the split JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(split, handle, indent=1)
    os.replace(tmp, path)


def load_split(path: Union[str, Path]) -> dict:
    """Read a split JSON written by `save_split`; raises `DataError` naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file '{path}' does not exist (it is written to the run directory by train.py)")
    try:
        with open(path, encoding="utf-8") as handle:
            split = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"split file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")):
        raise DataError(f"split file '{path}' must be a JSON object with 'train' and 'val' lists of file stems")
    overlap = set(split["train"]) & set(split["val"])
    if overlap:
        raise DataError(f"split file '{path}': {len(overlap)} stem(s) in both train and val (e.g. {min(overlap)})")
    return split
