"""Duplicate content across two dataset roots: `python -m datasets.check ROOT --against OTHER_ROOT`.

Before scoring a checkpoint on another dataset, check whether that dataset holds copies of the images the model
trained on (public brain-MRI sets are often assembled from each other). Both roots are read with their layout's
indexer (every split that exists: train and test), every image is fingerprinted once, and:

- `cross_matches(a, b)` lists, for each image of `a`, the images of `b` with identical decoded pixels (`exact`) or
  a 32x32 thumbnail correlation >= the threshold (`near`), as `datasets.duplicates.leaked_stems` defines them;
- `compare_roots` counts those images per class on each side and writes the duplicate manifest in the format of
  the within-one-release check (`datasets.duplicates.write_manifest`), its splits named `root:<split>` and
  `against:<split>`, keeping the groups that have members in both roots.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .duplicates import NEAR_THRESHOLD, find_groups, leaked_stems, write_manifest
from .errors import DataError
from .index import Sample
from .naming import CLASS_NAMES

SIDES = ("root", "against")
SPLITS = ("train", "test")


def class_name_of(sample: Sample) -> str:
    """The project class of a sample, or `unlabelled` for a layout without classes (pairs)."""
    return CLASS_NAMES[sample.label] if 0 <= sample.label < len(CLASS_NAMES) else "unlabelled"


def split_samples(root: Union[str, Path], index: Callable[[Path, str], list[Sample]]) -> dict[str, list[Sample]]:
    """{split: samples} for each of train and test that `index(root, split)` can read; a root with neither
    raises the indexer's `DataError` for the test split."""
    found: dict[str, list[Sample]] = {}
    problem: Optional[DataError] = None
    for split in SPLITS:
        try:
            found[split] = index(Path(root), split)
        except DataError as exc:
            problem = exc
    if not found:
        raise problem  # type: ignore[misc]
    return found


def cross_matches(samples: Sequence[Sample], others: Sequence[Sample], near_threshold: Optional[float] = NEAR_THRESHOLD,
                  cache_dir: Optional[Union[str, Path]] = None, workers: Optional[int] = None) -> dict[str, dict]:
    """{stem of `samples`: {"kind": "exact" | "near", "matches": [stems of `others`]}} for every image with a
    copy among `others`: `exact` when some match has identical decoded pixels, `near` when its matches only
    correlate at >= `near_threshold` (None: exact copies only). Unlike within one dataset, the very same file
    on both sides (a root scored against itself, linked files) is a copy too: an exact one."""
    exact = leaked_stems(samples, others, None, cache_dir, workers)
    near = leaked_stems(samples, others, near_threshold, cache_dir, workers) if near_threshold is not None else exact
    same_file = {Path(o.image).resolve(): o.stem for o in others}
    for sample in samples:
        twin = same_file.get(Path(sample.image).resolve())
        if twin is not None:  # leaked_stems never matches a file with itself
            for found in (exact, near):
                found[sample.stem] = sorted(set(found.get(sample.stem, [])) | {twin})
    return {stem: {"kind": "exact" if stem in exact else "near", "matches": matches}
            for stem, matches in sorted(near.items())}


def per_class_counts(samples: Sequence[Sample], matches: dict[str, dict]) -> dict[str, dict[str, int]]:
    """{class: {"images", "exact", "near"}}: how many images of each class have an exact or (only) a near copy."""
    totals = Counter(class_name_of(s) for s in samples)
    counts = {name: {"images": n, "exact": 0, "near": 0} for name, n in sorted(totals.items())}
    for sample in samples:
        found = matches.get(sample.stem)
        if found:
            counts[class_name_of(sample)][found["kind"]] += 1
    return counts


def compare_roots(root: Union[str, Path], index: Callable[[Path, str], list[Sample]], other: Union[str, Path],
                  other_index: Callable[[Path, str], list[Sample]], manifest: Union[str, Path],
                  near_threshold: Optional[float] = NEAR_THRESHOLD, workers: Optional[int] = None) -> dict:
    """Exact and near duplicates between `root` and `other` (each read by its own indexer); writes the manifest
    to `manifest` and returns {"images", "matches" (per side: stem -> kind and matches), "per_class",
    "groups"}."""
    sides = {"root": split_samples(root, index), "against": split_samples(other, other_index)}
    flat = {side: [s for split in SPLITS for s in sides[side].get(split, [])] for side in SIDES}
    name_of = {Path(s.image): f"{side}:{split}" for side in SIDES for split, samples in sides[side].items()
               for s in samples}
    with tempfile.TemporaryDirectory() as cache:  # each file list is decoded once, then read from the cache
        matches = {"root": cross_matches(flat["root"], flat["against"], near_threshold, cache, workers),
                   "against": cross_matches(flat["against"], flat["root"], near_threshold, cache, workers)}
        groups = find_groups(flat["root"] + flat["against"], near_threshold, cache, workers,
                             split_name=lambda s: name_of[Path(s.image)])
    groups = [g for g in groups if len({split.split(":")[0] for split in g.splits}) == 2]
    per_class = {side: per_class_counts(flat[side], matches[side]) for side in SIDES}
    images = {name: len(samples) for side in SIDES for name, samples in
              ((f"{side}:{split}", samples) for split, samples in sides[side].items())}
    write_manifest(groups, manifest, near_threshold, extra={
        "roots": {"root": str(root), "against": str(other)}, "images": images,
        "groups_kept": "only groups with members in both roots", "per_class": per_class,
        "cross_matches": matches})
    return {"images": images, "matches": matches, "per_class": per_class, "groups": groups}


def render_comparison(result: dict, root: Union[str, Path], other: Union[str, Path], manifest: Union[str, Path],
                      near_threshold: Optional[float]) -> str:
    """The console summary of `compare_roots`: per side and class, images with an exact or near copy."""
    names = {"root": str(root), "against": str(other)}
    near = f"thumbnail correlation >= {near_threshold}" if near_threshold is not None else "off"
    lines = [f"cross-dataset duplicates: {names['root']} against {names['against']} (exact: identical decoded "
             f"pixels; near: {near})"]
    for side, opposite in (("root", "against"), ("against", "root")):
        counts = result["per_class"][side]
        total = sum(c["images"] for c in counts.values())
        exact, near_only = (sum(c[k] for c in counts.values()) for k in ("exact", "near"))
        lines.append(f"  {names[side]}: {exact} of {total} images have an identical image in {names[opposite]}, "
                     f"{near_only} more a near-identical one")
        for name, c in counts.items():
            lines.append(f"    {name}: {c['exact']} exact + {c['near']} near of {c['images']}")
    kinds = Counter(g.kind for g in result["groups"])
    lines.append(f"  groups across the two roots: {kinds.get('exact', 0)} exact, {kinds.get('near', 0)} near; "
                 f"manifest written to {manifest}")
    return "\n".join(lines)
