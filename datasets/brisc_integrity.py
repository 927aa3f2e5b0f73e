"""Integrity checks of a BRISC-layout release (`python -m datasets.check ROOT`; the CLI is datasets/check.py).

Errors: missing folders, folders of unknown classes, bad file names and unknown codes, class folder/code
disagreements, unreadable images or masks, images below the minimum size (32 px a side), masks of another
size than their image, empty masks of tumour images.
Warnings: 16-bit images, tumour images without a mask, masks without an image or of no-tumour images,
segmentation images that differ from their classification image, names of another split, and duplicated
content (the same decoded pixels) within a split or across train and test.
`write_duplicate_manifest` writes the exact and near duplicate groups (see `datasets.duplicates`).
"""
from __future__ import annotations

import hashlib
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .confounds import jpeg_channels as _jpeg_channels
from .decode import MASK_THRESHOLD, MIN_IMAGE_SIDE, ImageTooSmallError, decode_grey, read_grey
from .duplicates import NEAR_THRESHOLD, find_groups, leaked_stems, read_manifest, write_manifest
from .errors import DataError
from .integrity_report import Report, report_identical_content
from .index import IMAGE_SUFFIXES, classification_dir, index_split, list_files, masks_dir, unknown_class_folders
from .naming import CLASS_NAMES, NO_TUMOR, BriscNameError, parse_name


@dataclass
class ImageFacts:
    path: Path
    shape: Optional[tuple[int, int]] = None  # (height, width); None when unreadable
    channels: int = 0
    digest: str = ""  # hash of the decoded pixels
    depth: int = 8  # bits per pixel in the file
    problem: str = ""
    too_small: bool = False


def _inspect_image(path: Path) -> ImageFacts:
    facts = ImageFacts(path)
    try:
        grey, facts.depth = decode_grey(path)
    except DataError as exc:
        facts.problem, facts.too_small = str(exc), isinstance(exc, ImageTooSmallError)
        return facts
    facts.shape = grey.shape
    facts.digest = hashlib.blake2b(grey.tobytes(), digest_size=16).hexdigest()
    facts.channels = _jpeg_channels(path)
    return facts


def _inspect_mask(path: Path) -> tuple[Optional[tuple[int, int]], int, str]:
    """(shape, foreground pixels after the threshold, problem)."""
    try:
        mask = read_grey(path, what="mask")
    except DataError as exc:
        return None, 0, str(exc)
    return mask.shape, int(np.count_nonzero(mask >= MASK_THRESHOLD)), ""


def check_split(root: Path, split: str, report: Report, pool: ThreadPoolExecutor) -> dict[str, list[str]]:
    """Check one split; returns {pixel digest: [image paths]} for the duplicate search."""
    cls_dir = classification_dir(root, split)
    labels: dict[str, int] = {}
    paths: list[Path] = []
    for folder in unknown_class_folders(cls_dir):
        report.error("folder of an unknown class (training refuses it)",
                     f"{folder} (classes: {', '.join(CLASS_NAMES)})")
    for label, class_name in enumerate(CLASS_NAMES):
        folder = cls_dir / class_name
        if not folder.is_dir():
            report.error("missing class folder", str(folder))
            continue
        files = list_files(folder, IMAGE_SUFFIXES)
        if not files:
            report.error("empty class folder", str(folder))
        for path in files:
            try:
                name = parse_name(path)
            except BriscNameError as exc:
                report.error("bad file name or unknown code", str(exc))
                continue
            if name.label != label:
                report.error("folder/code disagreement", f"{path} (code '{name.code}' is {name.class_name})")
            if name.split != split:
                report.warn("name of another split", str(path))
            if name.code == "nt":
                report.warn("alias code 'nt' (the release writes 'no')", str(path))
            labels[name.stem] = label
            paths.append(path)

    facts = {f.path.stem: f for f in pool.map(_inspect_image, paths)}
    for f in facts.values():
        if f.problem:
            report.error(f"image below {MIN_IMAGE_SIDE} px" if f.too_small else "unreadable image", f.problem)
        elif f.depth != 8:
            report.warn(f"{f.depth}-bit image (scaled to 8 bits by its bit depth in use)", str(f.path))

    mask_folder = masks_dir(root, split)
    mask_paths = list_files(mask_folder, (".png",)) if mask_folder.is_dir() else []
    if not mask_folder.is_dir():
        report.warn("missing masks folder", str(mask_folder))
    masked: set[str] = set()
    for path, (shape, foreground, problem) in zip(mask_paths, pool.map(_inspect_mask, mask_paths)):
        stem = path.stem
        masked.add(stem)
        if problem:
            report.error("unreadable mask", problem)
            continue
        if stem not in labels:
            report.warn("mask without a classification image", str(path))
            continue
        image = facts[stem]
        if image.shape is not None and shape != image.shape:
            report.error("mask/image size mismatch",
                         f"{path} is {shape[1]}x{shape[0]}, image {image.shape[1]}x{image.shape[0]}")
        if labels[stem] == NO_TUMOR:
            report.warn("mask of a no-tumour image (ignored by the loader)", str(path))
        elif foreground == 0:
            report.error("empty tumour mask", f"{path} (nothing >= {MASK_THRESHOLD})")
    for stem, label in sorted(labels.items()):
        if label != NO_TUMOR and stem not in masked:
            report.warn("tumour image without a mask", str(facts[stem].path))

    _summarise_split(split, labels, facts, len(mask_paths), report)
    _check_segmentation_images(root, split, facts, report)
    by_digest: dict[str, list[str]] = defaultdict(list)
    for f in facts.values():
        if f.digest:
            by_digest[f.digest].append(str(f.path))
    return by_digest


def _check_segmentation_images(root: Path, split: str, facts: dict[str, ImageFacts], report: Report) -> None:
    """The segmentation images should be the classification images (copies, links, or link placeholders:
    small text files holding the relative link target, as a checkout without symlink support leaves them)."""
    folder = root / "segmentation_task" / split / "images"
    if not folder.is_dir():
        return
    placeholders = 0
    for path in list_files(folder, IMAGE_SUFFIXES):
        twin = facts.get(path.stem)
        if twin is None:
            report.warn("segmentation image without a classification image", str(path))
            continue
        data = path.read_bytes()
        if len(data) < 1024 and _resolves_to(path, data, twin.path):
            placeholders += 1
        elif data != twin.path.read_bytes():
            report.warn("segmentation image differs from its classification image", str(path))
    if placeholders:
        report.info.append(f"  segmentation_task/{split}/images: {placeholders} link placeholder file(s) "
                           "pointing to their classification image (the loader never reads these)")


def _resolves_to(path: Path, data: bytes, target: Path) -> bool:
    try:
        return (path.parent / data.decode("utf-8").strip()).resolve() == target.resolve()
    except (UnicodeDecodeError, OSError, ValueError):
        return False


def _summarise_split(split: str, labels: dict[str, int], facts: dict[str, ImageFacts], n_masks: int,
                     report: Report) -> None:
    counts = Counter(labels.values())
    classes = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(CLASS_NAMES))
    sizes = Counter(f.shape for f in facts.values() if f.shape is not None)
    common = ", ".join(f"{w}x{h} {n}" for (h, w), n in sizes.most_common(3))
    channels = Counter(f.channels for f in facts.values() if f.shape is not None)
    layout = ", ".join(f"{c}-channel {n}" if c else f"unknown {n}" for c, n in sorted(channels.items()))
    report.info.append(f"split {split}: {len(labels)} images ({classes}); {n_masks} masks")
    report.info.append(f"  sizes: {len(sizes)} distinct, most common {common}; {layout}")


def check_dataset(root: Union[str, Path], examples: int = 5, workers: int = 4) -> Report:
    """Run every check on `root` (all splits found under classification_task)."""
    root = Path(root)
    report = Report(examples=examples)
    report.info.append(f"BRISC integrity report for {root}")
    cls_root = root / "classification_task"
    if not cls_root.is_dir():
        report.error("missing folder", f"{cls_root} (is '{root}' a BRISC 2025 root?)")
        return report
    splits = sorted(p.name for p in cls_root.iterdir() if p.is_dir())
    for expected in ("train", "test"):
        if expected not in splits:
            report.error("missing split folder", str(cls_root / expected))
    digests: dict[str, dict[str, list[str]]] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for split in splits:
            digests[split] = check_split(root, split, report, pool)
    report_identical_content(report, digests)
    return report


def write_duplicate_manifest(root: Union[str, Path], path: Union[str, Path],
                             near_threshold: Optional[float] = NEAR_THRESHOLD, workers: int = 4) -> dict:
    """Find exact and near groups over every split of `root`, write the manifest to `path`, return it."""
    root = Path(root)
    splits = sorted(p.name for p in (root / "classification_task").iterdir() if p.is_dir())
    samples = {split: index_split(root, split) for split in splits}
    leaked = {}
    with tempfile.TemporaryDirectory() as cache:  # every file is decoded once for the three passes
        groups = find_groups([s for split in splits for s in samples[split]], near_threshold, cache, workers)
        for split in splits:
            if split == "train" or "train" not in samples:
                continue
            exact = leaked_stems(samples[split], samples["train"], None, cache, workers)
            near = leaked_stems(samples[split], samples["train"], near_threshold, cache, workers) \
                if near_threshold is not None else exact
            leaked[split] = {"images": len(samples[split]), "exact": len(exact), "near_only": len(near) - len(exact),
                             "train_matches": near}
    write_manifest(groups, path, near_threshold, extra={"root": str(root), "leaked_from_train": leaked,
                                                          "images": {k: len(v) for k, v in samples.items()}})
    return read_manifest(path)[1]


def manifest_summary(manifest: dict, path: Union[str, Path]) -> str:
    lines = [f"duplicate manifest {path} (near: thumbnail correlation >= {manifest['near_threshold']}):"]
    for kind, c in manifest["counts"].items():
        within = ", ".join(f"{split} {v['groups']} groups / {v['images']} images" for split, v in c["within"].items())
        lines.append(f"  {kind}: {c['groups']} groups / {c['images']} images; within a split: {within or 'none'}; "
                     f"across splits: {c['across']['groups']} groups / {c['across']['images']} images")
    for split, v in manifest["leaked_from_train"].items():
        lines.append(f"  {split}: {v['exact']} of {v['images']} images have an identical training image, "
                     f"{v['near_only']} more a near-identical one")
    return "\n".join(lines)
