"""Integrity report of a BRISC-layout dataset; exit status 1 when errors were found.

    python -m datasets.check ROOT [--examples 5] [--workers 4] [--manifest FILE [--near-threshold 0.99]]
                                  [--confounds [--config YAML [--audit-limit N]]]
    python -m datasets.check ROOT --format imagefolder --against BRISC_ROOT [--manifest FILE]

Errors: missing folders, folders of unknown classes, bad file names and unknown codes, class folder/code
disagreements, unreadable images or masks, images below the minimum size (32 px a side), masks of another
size than their image, empty masks of tumour images.
Warnings: 16-bit images (scaled to 8 bits by their own range), tumour images without a mask, masks without an
image or of no-tumour images, segmentation images that differ from their classification image, names of
another split, and duplicated content (the same decoded pixels) within a split or across train and test.

`--manifest FILE` also writes the duplicate manifest (JSON; see `datasets.duplicates`): exact and near
groups within and across splits, their counts, and per evaluation split the images with training copies.
`--confounds` adds the source-confound audit of the train split (see `datasets.confounds`); with `--config`,
also the audit of the model's inputs under that config's preprocessing (see `datasets.input_confounds`).
`--against OTHER_ROOT` compares two datasets instead (see `datasets.cross_check`): images of either with an exact
or near copy in the other, per class, and the manifest of the groups spanning both.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from utils.cli import add_debug_flag, non_negative_int, open_unit_float, positive_int, run_main
from utils.errors import InputError

from .confounds import jpeg_channels as _jpeg_channels
from .decode import MASK_THRESHOLD, MIN_IMAGE_SIDE, ImageTooSmallError, decode_grey, read_grey
from .duplicates import NEAR_THRESHOLD, find_groups, leaked_stems, read_manifest, write_manifest
from .errors import DataError
from .index import IMAGE_SUFFIXES, classification_dir, index_split, list_files, masks_dir, unknown_class_folders
from .naming import CLASS_NAMES, NO_TUMOR, BriscNameError, parse_name


@dataclass
class Report:
    """Findings grouped by kind: a count and the first few examples of each."""

    examples: int = 5
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    info: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind].append(detail)

    def warn(self, kind: str, detail: str) -> None:
        self.warnings[kind].append(detail)

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        lines = list(self.info)
        for title, group in (("errors", self.errors), ("warnings", self.warnings)):
            total = sum(len(v) for v in group.values())
            lines.append(f"{title}: {total}")
            for kind, details in group.items():
                lines.append(f"  {kind}: {len(details)}")
                lines.extend(f"    {d}" for d in details[: self.examples])
                if len(details) > self.examples:
                    lines.append(f"    ... and {len(details) - self.examples} more")
        lines.append("result: OK" if self.ok else f"result: {sum(len(v) for v in self.errors.values())} error(s)")
        return "\n".join(lines)


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
            report.warn(f"{f.depth}-bit image (its min..max range is scaled to 8 bits)", str(f.path))

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
    for group in by_digest.values():
        if len(group) > 1:
            report.warn(f"duplicate content within {split}", " == ".join(Path(p).name for p in group))
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
    if "train" in digests and "test" in digests:
        shared = sorted(set(digests["train"]) & set(digests["test"]))
        for digest in shared:
            pair = digests["train"][digest][:1] + digests["test"][digest][:1]
            report.warn("same content in train and test", " == ".join(Path(p).name for p in pair))
        report.info.append(f"train/test duplicates (identical decoded pixels): {len(shared)}")
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


def _manifest_summary(manifest: dict, path: Union[str, Path]) -> str:
    lines = [f"duplicate manifest {path} (near: thumbnail correlation >= {manifest['near_threshold']}):"]
    for kind, c in manifest["counts"].items():
        within = ", ".join(f"{split} {v['groups']} groups / {v['images']} images" for split, v in c["within"].items())
        lines.append(f"  {kind}: {c['groups']} groups / {c['images']} images; within a split: {within or 'none'}; "
                     f"across splits: {c['across']['groups']} groups / {c['across']['images']} images")
    for split, v in manifest["leaked_from_train"].items():
        lines.append(f"  {split}: {v['exact']} of {v['images']} images have an identical training image, "
                     f"{v['near_only']} more a near-identical one")
    return "\n".join(lines)


def _layout_index(args: argparse.Namespace) -> Callable[[Path, str], list]:
    """The loader's indexer for ROOT from the layout options."""
    from .check_layouts import layout_index

    if any("=" not in entry for entry in args.class_map):
        raise InputError("--class-map entries look like FOLDER=CLASS")
    return layout_index(args.format, args.train_dir, args.test_dir, dict(e.split("=", 1) for e in args.class_map),
                        args.mask_suffix, args.mask_threshold, args.test_fraction)


def _check_against(args: argparse.Namespace, start: float) -> int:
    """`--against OTHER_ROOT`: duplicates across the two roots (exit status 0: the comparison ran)."""
    from .check_layouts import layout_index
    from .cross_check import compare_roots, render_comparison

    root, other = Path(args.root), Path(args.against)
    manifest = Path(args.manifest or f"duplicates_{root.resolve().name}_vs_{other.resolve().name}.json")
    result = compare_roots(root, _layout_index(args), other, layout_index(args.against_format), manifest,
                           args.near_threshold, args.workers)
    print(render_comparison(result, root, other, manifest, args.near_threshold))
    print(f"checked in {time.perf_counter() - start:.1f} s")
    return 0


def _input_audit(args: argparse.Namespace) -> str:
    """`--confounds --config YAML`: the audit of the model's inputs (datasets/input_confounds.py)."""
    from utils.config import load_config

    from .input_confounds import input_audit, render_input_audit, subsample

    data_cfg = load_config(args.config).data
    samples = subsample(index_split(args.root, "train"), args.audit_limit)
    return render_input_audit(input_audit(samples, data_cfg, workers=args.workers))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Integrity report of a BRISC 2025-layout dataset.")
    parser.add_argument("root", help="folder holding classification_task/ and segmentation_task/")
    parser.add_argument("--examples", type=non_negative_int, default=5, help="examples listed per kind of finding")
    parser.add_argument("--workers", type=positive_int, default=4, help="decoding threads")
    parser.add_argument("--manifest", metavar="FILE", help="also write the duplicate manifest (JSON) to FILE")
    parser.add_argument("--near-threshold", type=open_unit_float, default=NEAR_THRESHOLD,
                        help="thumbnail correlation for near duplicates in the manifest (default %(default)s)")
    parser.add_argument("--confounds", action="store_true",
                        help="also measure how well trivial file/image properties predict the class (train split)")
    parser.add_argument("--config", metavar="YAML",
                        help="with --confounds: also audit the model's input under this config's preprocessing "
                             "(data.image_size, resize, head_margin, intensity_norm)")
    parser.add_argument("--audit-limit", type=positive_int, metavar="N",
                        help="with --config: audit the inputs of a class-stratified, seeded sample of N images")
    layout = parser.add_argument_group("other layouts (the data.* keys of the same names)")
    layout.add_argument("--format", choices=("brisc", "imagefolder", "pairs"), default="brisc")
    layout.add_argument("--train-dir", default="Training")
    layout.add_argument("--test-dir", default="Testing")
    layout.add_argument("--class-map", nargs="*", default=[], metavar="FOLDER=CLASS")
    layout.add_argument("--mask-suffix", default="")
    layout.add_argument("--mask-threshold", type=positive_int, default=MASK_THRESHOLD)
    layout.add_argument("--test-fraction", type=open_unit_float, default=0.2)
    cross = parser.add_argument_group("another dataset (datasets/cross_check.py)")
    cross.add_argument("--against", metavar="OTHER_ROOT",
                       help="instead of the integrity report, find images of ROOT that are exact or near copies of "
                            "images of OTHER_ROOT (and the reverse), per class of each side, and write the manifest "
                            "(--manifest FILE, default duplicates_<root>_vs_<other>.json)")
    cross.add_argument("--against-format", choices=("brisc", "imagefolder", "pairs"), default="brisc",
                       help="layout of OTHER_ROOT, read with the default settings of that layout")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if (args.config or args.audit_limit) and not args.confounds:
        parser.error("--config and --audit-limit belong to --confounds (the audit of the model's inputs)")
    start = time.perf_counter()
    if args.against:
        return _check_against(args, start)
    if args.format != "brisc":  # datasets/check_layouts.py: the loader's indexer, then every file decoded
        from .check_layouts import check_layout

        report = check_layout(Path(args.root), _layout_index(args), args.format, args.examples, args.workers)
        print(report.render() + f"\nchecked in {time.perf_counter() - start:.1f} s")
        return 0 if report.ok else 1
    report = check_dataset(args.root, examples=args.examples, workers=args.workers)
    print(report.render())
    if args.manifest and report.ok:
        print(_manifest_summary(write_duplicate_manifest(args.root, args.manifest, args.near_threshold,
                                                         args.workers), args.manifest))
    if args.confounds and report.ok:
        from .confounds import confound_audit, render_audit

        print(render_audit(confound_audit(args.root, workers=args.workers)))
        if args.config:
            print(_input_audit(args))
    print(f"checked in {time.perf_counter() - start:.1f} s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
