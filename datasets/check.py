"""`python -m datasets.check`: the integrity report of a dataset, its duplicates and confound audits (the command
line; the checks live in brisc_integrity.py, layout_integrity.py, cross_dataset_copies.py, confounds.py and
input_confounds.py). Exit status 1 when errors were found.

    python -m datasets.check ROOT [--examples 5] [--workers 4] [--manifest FILE [--near-threshold 0.99]]
                                  [--confounds [--config YAML [--audit-limit N]]]
    python -m datasets.check ROOT --format imagefolder --against BRISC_ROOT [--manifest FILE]

Errors: missing folders, folders of unknown classes, bad file names and unknown codes, class folder/code
disagreements, unreadable images or masks, images below the minimum size (32 px a side), masks of another
size than their image, empty masks of tumour images.
Warnings: 16-bit images (scaled to 8 bits by the bit depth in use), tumour images without a mask, masks
without an image or of no-tumour images, segmentation images that differ from their classification image, names of
another split, and duplicated content (the same decoded pixels) within a split or across train and test.

`--manifest FILE` also writes the duplicate manifest (JSON; see `datasets.duplicates`): exact and near
groups within and across splits, their counts, and per evaluation split the images with training copies.
`--confounds` adds the source-confound audit of the train split (see `datasets.confounds`); with `--config`,
also the audit of the model's inputs under that config's preprocessing (see `datasets.input_confounds`).
`--against OTHER_ROOT` compares two datasets instead (see `datasets.cross_dataset_copies`): images of either
with an exact or near copy in the other, per class, and the manifest of the groups spanning both.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from utils.cli import add_debug_flag, non_negative_int, open_unit_float, positive_int, run_main
from utils.errors import InputError

from .brisc_integrity import manifest_summary, check_dataset, write_duplicate_manifest
from .decode import MASK_THRESHOLD
from .duplicates import NEAR_THRESHOLD
from .index import index_split


def _layout_index(args: argparse.Namespace) -> Callable[[Path, str], list]:
    """The loader's indexer for ROOT from the layout options."""
    from .layout_integrity import layout_index

    if any("=" not in entry for entry in args.class_map):
        raise InputError("--class-map entries look like FOLDER=CLASS")
    return layout_index(args.format, args.train_dir, args.test_dir, dict(e.split("=", 1) for e in args.class_map),
                        args.mask_suffix, args.mask_threshold, args.test_fraction)


def _check_against(args: argparse.Namespace, start: float) -> int:
    """`--against OTHER_ROOT`: duplicates across the two roots (exit status 0: the comparison ran)."""
    from .layout_integrity import layout_index
    from .cross_dataset_copies import compare_roots, render_comparison

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
                             "(data.preprocess.image_size, resize, head_margin, intensity_norm)")
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
    cross = parser.add_argument_group("another dataset (datasets/cross_dataset_copies.py)")
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
    if args.format != "brisc":  # datasets/layout_integrity.py: the loader's indexer, then every file decoded
        from .layout_integrity import check_layout

        report = check_layout(Path(args.root), _layout_index(args), args.format, args.examples, args.workers)
        print(report.render() + f"\nchecked in {time.perf_counter() - start:.1f} s")
        return 0 if report.ok else 1
    report = check_dataset(args.root, examples=args.examples, workers=args.workers)
    print(report.render())
    if args.manifest and report.ok:
        print(manifest_summary(write_duplicate_manifest(args.root, args.manifest, args.near_threshold,
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
