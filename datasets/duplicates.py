"""Duplicate content within and across splits: exact copies (same decoded pixels) and near copies.

- Exact: `pixel_digest` hashes the decoded greyscale pixels (and their shape), so a re-encoded copy of an
  image matches as well as a byte-identical one.
- Near: the Pearson correlation of 32x32 area-averaged thumbnails (`thumbnail`, `correlation`) is at
  least `NEAR_THRESHOLD` = 0.99. Measured on the BRISC 2025 training split (5000 images): the 15 pairs at
  >= 0.9928 that are not pixel copies are the same image saved again (another size, a shifted crop, small
  pixel changes); 9 pairs between 0.990 and 0.9921 are neighbouring slices of one scan; below 0.99 are
  ordinary similar slices. In the 40-image test sample no image without a pixel copy in train reaches
  0.99 (the highest is 0.982). The counts at that threshold are in the README ("Duplicates").

`find_groups` links exact and near pairs into disjoint groups (connected components); `leaked_stems`
lists, for every evaluated image, the training images with the same (or near-identical) content. Both
work from per-file fingerprints (digest + thumbnail) that are cached on disk under a key of the file paths,
sizes and modification times, so only new or changed files are decoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import cv2
import numpy as np

from .decode import read_grey
from .index import Sample

NEAR_THRESHOLD = 0.99  # thumbnail correlation at or above which two images count as near-identical
# Similarity chains at or above SCAN_THRESHOLD approximate the slices of one scan (measured on BRISC 2025 train:
# docs/statistics.md); below the duplicate threshold, so duplicates are always inside one scan group.
SCAN_THRESHOLD = 0.96
THUMB_SIZE = 32
_CACHE_VERSION = 1  # bump when the digest or thumbnail definition changes
_BLOCK = 1024  # rows of the correlation matrix computed at once (memory stays small for any split size)


# --------------------------------------------------------------------------------------------- fingerprints
def _digest_of(grey: np.ndarray) -> str:
    shape = np.asarray(grey.shape, dtype=np.int64).tobytes()  # the same bytes in another shape differ
    return hashlib.blake2b(shape + grey.tobytes(), digest_size=16).hexdigest()


def _thumb_of(grey: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(grey.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def pixel_digest(path: Union[str, Path]) -> str:
    """Hex digest of the decoded greyscale pixels and their shape: equal for re-encoded copies."""
    return _digest_of(read_grey(Path(path)))


def thumbnail(path: Union[str, Path], size: int = THUMB_SIZE) -> np.ndarray:
    """(size, size) float32 area-averaged greyscale thumbnail of an image file (aspect ratio not kept)."""
    return _thumb_of(read_grey(Path(path)), size)


def _unit(thumbs: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm, so a dot product is the Pearson correlation; a flat
    thumbnail becomes zeros (correlation 0 with everything: it can only match exactly)."""
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 1e-9).astype(np.float32)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two thumbnails (0 when either is flat)."""
    units = _unit(np.stack([a, b]))
    return float(units[0] @ units[1])


@dataclass
class Fingerprints:
    """Digest and unit-norm thumbnail row of each of `paths`, in order."""

    paths: list[str]
    digests: list[str]
    units: np.ndarray  # (N, THUMB_SIZE**2) float32


def _file_key(paths: Sequence[Path]) -> str:
    entries = []
    for p in paths:
        st = os.stat(p)
        entries.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    payload = json.dumps([_CACHE_VERSION, THUMB_SIZE, entries]).encode()
    return hashlib.sha1(payload).hexdigest()[:16]


def fingerprints(paths: Sequence[Union[str, Path]], cache_dir: Optional[Union[str, Path]] = None,
                 workers: Optional[int] = None) -> Fingerprints:
    """Decode every file once (threads: OpenCV releases the GIL); with `cache_dir`, reuse or write
    `<cache_dir>/fingerprints_<n>_<key>.npz`, keyed by the resolved paths, sizes and mtimes."""
    paths = [Path(p) for p in paths]
    cache_file = None
    if cache_dir is not None and paths:
        cache_file = Path(cache_dir) / f"fingerprints_{len(paths)}_{_file_key(paths)}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file) as data:
                    digests, units = [str(d) for d in data["digests"]], data["units"]
                if len(digests) == len(paths):
                    return Fingerprints([str(p) for p in paths], digests, units)
            except (OSError, ValueError, KeyError):
                pass  # truncated or foreign file: rebuild it

    def one(path: Path) -> tuple[str, np.ndarray]:
        grey = read_grey(path)
        return _digest_of(grey), _thumb_of(grey, THUMB_SIZE)

    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_workers) as pool:
        results = list(pool.map(one, paths))
    digests = [d for d, _ in results]
    units = _unit(np.stack([t for _, t in results])) if results else np.zeros((0, THUMB_SIZE**2), np.float32)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, digests=np.asarray(digests), units=units)
        os.replace(tmp, cache_file)
    return Fingerprints([str(p) for p in paths], digests, units)


def near_pairs(units_a: np.ndarray, units_b: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, correlation) for every row i of `units_a` and j of `units_b` correlating at >= threshold."""
    pairs = []
    for start in range(0, len(units_a), _BLOCK):
        corr = units_a[start:start + _BLOCK] @ units_b.T
        for i, j in zip(*np.nonzero(corr >= threshold)):
            pairs.append((start + int(i), int(j), float(corr[i, j])))
    return pairs


# --------------------------------------------------------------------------------------------- groups
def split_of(sample: Sample) -> str:
    """The split a sample was indexed from: `<root>/classification_task/<split>/<class>/<file>`."""
    return sample.image.parent.parent.name


@dataclass(frozen=True)
class DuplicateGroup:
    """Images with the same content: `kind` "exact" when all decoded pixels are identical, "near" when at
    least one member is linked only by a thumbnail correlation >= the threshold."""

    kind: str
    stems: tuple[str, ...]
    splits: tuple[str, ...]  # the split of each stem
    digests: tuple[str, ...]  # the pixel digest of each stem (equal digests: exact copies inside the group)

    @property
    def cross_split(self) -> bool:
        return len(set(self.splits)) > 1

    def to_dict(self) -> dict:
        return {"kind": self.kind, "members": [{"stem": s, "split": sp, "digest": d}
                                               for s, sp, d in zip(self.stems, self.splits, self.digests)]}

    @classmethod
    def from_dict(cls, data: dict) -> "DuplicateGroup":
        members = data["members"]
        return cls(data["kind"], tuple(m["stem"] for m in members), tuple(m["split"] for m in members),
                   tuple(m["digest"] for m in members))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def find_groups(samples: Sequence[Sample], near_threshold: Optional[float] = NEAR_THRESHOLD,
                cache_dir: Optional[Union[str, Path]] = None, workers: Optional[int] = None,
                split_name: Callable[[Sample], str] = split_of) -> list[DuplicateGroup]:
    """Disjoint groups (two or more images) of exact and near-identical content among `samples`, which may
    come from several splits (`split_name(sample)` names a sample's split, e.g. `root:test` across two
    datasets). `near_threshold=None` finds exact copies only. Groups are sorted by their first stem; members
    by (split, stem)."""
    samples = sorted(samples, key=lambda s: (split_name(s), s.stem))
    prints = fingerprints([s.image for s in samples], cache_dir, workers)
    links = _UnionFind(len(samples))
    first_of: dict[str, int] = {}
    for i, digest in enumerate(prints.digests):
        links.union(first_of.setdefault(digest, i), i)
    if near_threshold is not None:
        for i, j, _ in near_pairs(prints.units, prints.units, near_threshold):
            if i < j:
                links.union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(len(samples)):
        members.setdefault(links.find(i), []).append(i)
    groups = []
    for idx in members.values():
        if len(idx) < 2:
            continue
        digests = tuple(prints.digests[i] for i in idx)
        groups.append(DuplicateGroup("exact" if len(set(digests)) == 1 else "near",
                                     tuple(samples[i].stem for i in idx), tuple(split_name(samples[i]) for i in idx),
                                     digests))
    return sorted(groups, key=lambda g: g.stems[0])


def scan_group_ids(samples: Sequence[Sample], threshold: float = SCAN_THRESHOLD,
                   cache_dir: Optional[Union[str, Path]] = None, workers: Optional[int] = None) -> np.ndarray:
    """(N,) scan-group id of each sample, in the order given: similarity chains (identical pixels, or 32x32
    thumbnail correlation >= `threshold`, linked transitively) approximate the slices of one scan; an image
    linked to none is a group of its own. The intervals and paired tests resample these groups."""
    groups = find_groups(samples, threshold, cache_dir=cache_dir, workers=workers)
    by_stem: dict[str, int] = {}
    for k, group in enumerate(groups):
        for stem in group.stems:
            by_stem[stem] = k
    ids, next_id = [], len(groups)
    for sample in samples:
        if sample.stem in by_stem:
            ids.append(by_stem[sample.stem])
        else:
            ids.append(next_id)
            next_id += 1
    return np.array(ids, dtype=np.int64)


def leaked_stems(eval_samples: Sequence[Sample], train_samples: Sequence[Sample],
                 near_threshold: Optional[float] = NEAR_THRESHOLD, cache_dir: Optional[Union[str, Path]] = None,
                 workers: Optional[int] = None) -> dict[str, list[str]]:
    """{evaluated stem: [training stems with identical pixels or, unless `near_threshold` is None, a
    thumbnail correlation >= it]} for every evaluated image that has such a training image. An image is
    never its own leak (the same file in both lists is skipped). Fingerprints are cached in `cache_dir`."""
    eval_prints = fingerprints([s.image for s in eval_samples], cache_dir, workers)
    train_prints = fingerprints([s.image for s in train_samples], cache_dir, workers)
    train_index = {t.stem: j for j, t in enumerate(train_samples)}
    same_file = {(i, train_index[s.stem]) for i, s in enumerate(eval_samples) if s.stem in train_index
                 and Path(s.image).resolve() == Path(train_samples[train_index[s.stem]].image).resolve()}
    by_digest: dict[str, list[int]] = {}
    for j, digest in enumerate(train_prints.digests):
        by_digest.setdefault(digest, []).append(j)
    matches: dict[int, set[int]] = {}
    for i, digest in enumerate(eval_prints.digests):
        for j in by_digest.get(digest, []):
            matches.setdefault(i, set()).add(j)
    if near_threshold is not None and len(eval_prints.paths) and len(train_prints.paths):
        for i, j, _ in near_pairs(eval_prints.units, train_prints.units, near_threshold):
            matches.setdefault(i, set()).add(j)
    leaks = {}
    for i, js in matches.items():
        stems = sorted(train_samples[j].stem for j in js if (i, j) not in same_file)
        if stems:
            leaks[eval_samples[i].stem] = stems
    return dict(sorted(leaks.items()))


# --------------------------------------------------------------------------------------------- manifest
def manifest_counts(groups: Sequence[DuplicateGroup]) -> dict:
    """Groups and images per kind, within one split (per split) and across splits."""
    counts: dict = {}
    for kind in ("exact", "near"):
        chosen = [g for g in groups if g.kind == kind]
        within: dict[str, dict[str, int]] = {}
        for g in chosen:
            if not g.cross_split:
                entry = within.setdefault(g.splits[0], {"groups": 0, "images": 0})
                entry["groups"] += 1
                entry["images"] += len(g.stems)
        across = [g for g in chosen if g.cross_split]
        counts[kind] = {"groups": len(chosen), "images": sum(len(g.stems) for g in chosen),
                        "within": dict(sorted(within.items())),
                        "across": {"groups": len(across), "images": sum(len(g.stems) for g in across)}}
    return counts


def write_manifest(groups: Sequence[DuplicateGroup], path: Union[str, Path],
                   near_threshold: Optional[float] = NEAR_THRESHOLD, extra: Optional[dict] = None) -> None:
    """Write the JSON manifest (threshold, counts, groups) atomically; `extra` adds top-level fields."""
    path = Path(path)
    data = {"near_threshold": near_threshold, "near_measure": f"Pearson correlation of {THUMB_SIZE}x{THUMB_SIZE} "
            "area-averaged greyscale thumbnails", "exact_measure": "identical decoded greyscale pixels",
            "counts": manifest_counts(groups), **(extra or {}), "groups": [g.to_dict() for g in groups]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(path: Union[str, Path]) -> tuple[list[DuplicateGroup], dict]:
    """(groups, the whole manifest dict) from a file written by `write_manifest`."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return [DuplicateGroup.from_dict(g) for g in data["groups"]], data
