"""Stratified train/validation splits and K folds of the release's train folder, stored as small JSONs of stems.

Groups of duplicate content (`datasets.duplicates.find_groups`) can be kept on one side of every split, so
no validation image has a copy in training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .errors import DataError


def _check_inputs(stems: Sequence[str], labels: Sequence[int]) -> None:
    if len(stems) != len(labels):
        raise ValueError(f"{len(stems)} stems but {len(labels)} labels")
    if len(set(stems)) != len(stems):
        raise ValueError("stems must be unique")


def _units(stems: Sequence[str], labels: Sequence[int], groups: Optional[Iterable[Iterable[str]]]
           ) -> list[list[str]]:
    """Disjoint units that must stay together: the given groups (restricted to `stems`, overlapping groups
    merged) and every other stem alone; each unit sorted, the list sorted, so the input order never matters."""
    known = set(stems)
    owner: dict[str, int] = {}
    units: list[set[str]] = []
    for group in groups or ():
        members = {s for s in group if s in known}
        merged = {owner[s] for s in members if s in owner}
        for k in merged:
            members |= units[k]
            units[k] = set()
        units.append(members)
        for s in members:
            owner[s] = len(units) - 1
    out = [sorted(u) for u in units if u]
    out += [[s] for s in sorted(known - set(owner))]
    return sorted(out)


def _assign(units: list[list[str]], label_of: dict[str, int], targets: np.ndarray, seed: int) -> list[int]:
    """Bin of each unit (targets: bins x classes). Large units go first, equal sizes in seeded random order;
    a unit goes to one of the bins with room for all its members, at random with probability proportional
    to that room, or, when none has, to the bin where it overshoots the least."""
    rng = np.random.default_rng(seed)
    room = targets.astype(float).copy()
    order = sorted(range(len(units)), key=lambda u: (-len(units[u]), rng.random()))
    chosen = [0] * len(units)
    for u in order:
        counts = np.bincount([label_of[s] for s in units[u]], minlength=room.shape[1])
        fits = np.all(room >= counts, axis=1)
        if fits.any():
            weight = np.where(fits, (room * (counts > 0)).sum(axis=1), 0.0)
            b = int(rng.choice(len(weight), p=weight / weight.sum()))
        else:
            b = int(np.argmax(np.minimum(room - counts, 0).sum(axis=1)))
        room[b] -= counts
        chosen[u] = b
    return chosen


def _class_index(labels: Sequence[int]) -> tuple[dict[int, int], np.ndarray]:
    classes = sorted({int(l) for l in labels})
    index = {c: k for k, c in enumerate(classes)}
    return index, np.bincount([index[int(l)] for l in labels], minlength=len(classes))


def make_split(stems: Sequence[str], labels: Sequence[int], val_fraction: float, seed: int,
               groups: Optional[Iterable[Iterable[str]]] = None) -> dict:
    """Per class, `round(n * val_fraction)` images go to validation (at least one when the class has two or
    more images and the fraction is positive). Each of `groups` (stems with duplicate content) stays on one
    side, which can move a class's count by a group's size. The result depends only on the set of
    (stem, label) pairs, the groups, the fraction and the seed, not on the input order."""
    _check_inputs(stems, labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    class_of, sizes = _class_index(labels)
    n_val = np.rint(sizes * val_fraction).astype(int)
    if val_fraction > 0:
        n_val = np.where(sizes >= 2, np.clip(n_val, 1, sizes - 1), n_val)
    label_of = {s: class_of[int(l)] for s, l in zip(stems, labels)}
    units = _units(stems, labels, groups)
    bins = _assign(units, label_of, np.stack([sizes - n_val, n_val]), seed)
    val = sorted(s for unit, b in zip(units, bins) if b == 1 for s in unit)
    val_set = set(val)
    return {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "group_duplicates": groups is not None,
        "duplicate_groups": sum(1 for unit in units if len(unit) > 1),
        "train": sorted(s for s in stems if s not in val_set),
        "val": val,
    }


def carve_dev_test(split: dict, stems: Sequence[str], labels: Sequence[int], fraction: float, seed: int,
                   groups: Optional[Iterable[Iterable[str]]] = None) -> dict:
    """The split with a held-out `dev_test` part taken from its train part only (the validation part is left
    exactly as it was): per class `round(n * fraction)` images of the whole release, stratified, each group
    (duplicates or scan) whole on one side. Nothing in training may ever read it: no early stopping, checkpoint
    choice, threshold or temperature fitting, no recipe choice."""
    _check_inputs(stems, labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_dev_fraction must be in (0, 1), got {fraction}")
    class_of, sizes = _class_index(labels)
    label_of = {s: class_of[int(l)] for s, l in zip(stems, labels)}
    remainder = [s for s in split["train"] if s in label_of]
    units = _units(remainder, [label_of[s] for s in remainder], groups)
    left = np.bincount([label_of[s] for s in remainder], minlength=len(sizes))
    n_dev = np.minimum(np.rint(sizes * fraction).astype(int), np.maximum(left - 1, 0))
    bins = _assign(units, label_of, np.stack([left - n_dev, n_dev]), seed + 1)  # its own draw, not the val one
    dev = sorted(s for unit, b in zip(units, bins) if b == 1 for s in unit)
    dev_set = set(dev)
    return {**split, "train": [s for s in split["train"] if s not in dev_set], "dev_test": dev,
            "test_dev_fraction": float(fraction)}


SPLIT_ROLES = {"train": "training", "val": "selection", "dev_test": "held out", "test": "held out"}


def split_role(split: str) -> str:
    """The role of an evaluated split: `training` (the model fitted it), `selection` (val: early stopping,
    checkpoint, threshold, temperature and recipe choices were made on it, so its figures are optimistic) or
    `held out` (dev_test and the release's test split: nothing ever touched them; only these are results)."""
    if split not in SPLIT_ROLES:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLIT_ROLES)}")
    return SPLIT_ROLES[split]


def make_folds(stems: Sequence[str], labels: Sequence[int], folds: int, seed: int,
               groups: Optional[Iterable[Iterable[str]]] = None) -> dict[str, int]:
    """{stem: fold} for K-fold cross-validation: every image in exactly one fold, each class spread as evenly
    as the groups allow (a class's remainder images go to seeded random folds), each group in one fold."""
    _check_inputs(stems, labels)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    class_of, sizes = _class_index(labels)
    rng = np.random.default_rng([seed, folds])
    targets = np.zeros((folds, len(sizes)), int)
    for c, n in enumerate(sizes):
        targets[:, c] = n // folds
        targets[rng.permutation(folds)[: n % folds], c] += 1
    label_of = {s: class_of[int(l)] for s, l in zip(stems, labels)}
    units = _units(stems, labels, groups)
    bins = _assign(units, label_of, targets, seed)
    return {s: b for unit, b in zip(units, bins) for s in unit}


def fold_split(stems: Sequence[str], labels: Sequence[int], folds: int, fold: int, seed: int,
               groups: Optional[Iterable[Iterable[str]]] = None) -> dict:
    """The train/val split whose validation part is fold `fold` of `make_folds`."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    assignment = make_folds(stems, labels, folds, seed, groups)
    return {
        "seed": int(seed),
        "folds": int(folds),
        "fold": int(fold),
        "group_duplicates": groups is not None,
        "duplicate_groups": sum(1 for unit in _units(stems, labels, groups) if len(unit) > 1),
        "train": sorted(s for s, f in assignment.items() if f != fold),
        "val": sorted(s for s, f in assignment.items() if f == fold),
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
    parts = [k for k in ("train", "val", "dev_test") if k in split]
    if "dev_test" in split and not isinstance(split["dev_test"], list):
        raise DataError(f"split file '{path}': 'dev_test' must be a list of file stems")
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            overlap = set(split[a]) & set(split[b])
            if overlap:
                raise DataError(f"split file '{path}': {len(overlap)} stem(s) in both {a} and {b} "
                                f"(e.g. {min(overlap)})")
    return split
