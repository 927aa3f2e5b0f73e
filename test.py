"""Evaluate a checkpoint, or predict on a folder of images. The config comes from the checkpoint.

    python test.py --checkpoint runs/demo/<timestamp>/best.pth
    python test.py --checkpoint best.pth --data-root /data/brisc2025 --split test --tta
    python test.py --checkpoint best.pth --split test --tune-threshold --gradcam 4
    python test.py --checkpoint best.pth --split test --subset all --calibrate
    python test.py --checkpoint best.pth --input my_slices/ --out predictions/
    python test.py --checkpoint best.pth --input my_slices/ --runtime onnxruntime      # exported runtime
    python test.py --checkpoint best.pth --split val --runtime onnxruntime --precision int8-dynamic
    python test.py --checkpoint best.pth --data-root /data/kaggle --data-format imagefolder \
        --class-map 'glioma=tumour,meningioma=tumour,pituitary=tumour,no_tumor=normal'
    python test.py --checkpoint best.pth --data-root /data/pairs --data-format pairs --layout data.layout.mask_suffix=_mask
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.allocator import keep_freed_memory
from utils.checkpoint import resolve_checkpoint_arg
from utils.cli import add_debug_flag, add_eval_flags, non_negative_int, positive_float, run_main
from utils.config import ConfigError
from utils.lock import run_lock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_flags(parser, checkpoint_help="best.pth / last.pth of a run (a run folder: its best.pth)")
    parser.add_argument("--data-format", default=None, choices=["brisc", "imagefolder", "pairs"],
                        help="score another dataset at --data-root in this layout: only the figures it supports "
                             "(imagefolder: classes, pairs: masks), its images with copies in the run's training "
                             "data left out of the leak-free subset; output folder test_ext_<root name>_<split>")
    parser.add_argument("--class-map", default=None, metavar="NAME=LABEL,... | FILE.yaml",
                        help="with --data-format: map the dataset's folder names and the model's class names into "
                             "one label space, e.g. 'glioma=tumour,meningioma=tumour,pituitary=tumour,"
                             "no_tumor=normal' (unlisted names map to themselves; default: data.layout.class_map of the run)")
    parser.add_argument("--layout", nargs="*", default=[], metavar="data.KEY=VALUE",
                        help="with --data-format: the other dataset's layout keys, e.g. data.layout.mask_suffix=_mask "
                             "data.layout.test_dir=Test (train_dir, test_dir, class_map, mask_suffix, mask_threshold, "
                             "test_fraction, split_seed, spacing)")
    parser.add_argument("--external", type=Path, default=None, metavar="FILE.yaml",
                        help="another dataset described in a file (configs/external/pmram.yaml): its root, "
                             "format, class map and layout in place of the four flags above")
    parser.add_argument("--opts", nargs="*", default=None, metavar="data.KEY=VALUE",
                        help="deprecated: the old name of --layout (it never took train.py's config keys)")
    parser.add_argument("--spacing", type=positive_float, nargs=2, default=None, metavar=("ROW_MM", "COL_MM"),
                        help="pixel spacing in mm: HD95 / ASSD in mm (default: data.layout.spacing of the run; with "
                             "--data-format: pixels)")
    parser.add_argument("--tune-threshold", action="store_true",
                        help="choose the threshold with the best Dice on the validation split, then evaluate "
                             "another split (not with --split val)")
    parser.add_argument("--subset", default="leak_free", choices=["leak_free", "all"],
                        help="what the headline figures mean: leak_free (default: without images that share "
                             "content with the training data) or all; every subset is reported either way")
    parser.add_argument("--calibrate", action="store_true",
                        help="temperature-scale the classifier, fitted on the validation split (not with --split val)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                        help="resamples for the 95%% bootstrap intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--input", type=Path, default=None, help="predict on a folder of unlabelled images")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: inside the run directory)")
    parser.add_argument("--gradcam", type=non_negative_int, default=0, metavar="N",
                        help="Grad-CAM overlays for N images per class")
    parser.add_argument("--gradcam-layer", default=None, metavar="NAME",
                        help="Grad-CAM target layer as a dotted module name (default: the last encoder stage)")
    parser.add_argument("--gate-masks", action=argparse.BooleanOptionalAction, default=None,
                        help="empty the mask where the classifier says no_tumor (default: eval.gate_masks)")
    parser.add_argument("--no-progress", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.opts is not None:
        print("warning: --opts is deprecated for test.py; it sets another dataset's layout keys only: use --layout",
              file=sys.stderr)
        args.layout = [*args.layout, *args.opts]
    return args


def use_external_set(args: argparse.Namespace) -> None:
    """Fill --data-root / --data-format / --class-map / --layout from an --external file (not beside them)."""
    from evaluation.external_sets import read_external_set

    given = [flag for flag, value in (("--data-root", args.data_root), ("--data-format", args.data_format),
                                      ("--class-map", args.class_map), ("--layout", args.layout)) if value]
    if given:
        raise ConfigError(f"--external {args.external} already says {', '.join(given)}: give one or the other")
    external = read_external_set(args.external)
    args.data_root, args.data_format, args.layout = external.root, external.data_format, list(external.layout)
    args.class_map = dict(external.class_map) if external.class_map else None  # already checked


def main(argv: list[str] | None = None) -> int:
    """Evaluate or predict; a mistake in the input raises a `UserError` (printed by `run_main`)."""
    args = parse_args(argv)
    from prediction.folder import predict_folder
    from evaluation.pipeline import TestOptions, run_test

    checkpoint = resolve_checkpoint_arg(args.checkpoint)
    if args.external is not None:
        use_external_set(args)
    for flag, used in (("--class-map", args.class_map is not None), ("--layout", bool(args.layout))):
        if used and args.data_format is None:
            raise ConfigError(f"{flag} applies to another dataset: give --data-format (and --data-root) too")
    class_map = None
    if isinstance(args.class_map, dict):  # from an --external file
        class_map = args.class_map
    elif args.class_map is not None:
        from evaluation.labels import parse_class_map

        class_map = parse_class_map(args.class_map)
    if args.input is not None:
        failed = predict_folder(checkpoint, args.input, args.out, args.device, args.threshold, args.tta,
                                use_ema=not args.no_ema, runtime=args.runtime, precision=args.precision,
                                batch_size=args.batch_size, workers=args.num_workers)
        return 1 if failed else 0
    options = TestOptions(
        checkpoint=checkpoint, split=args.split, data_root=args.data_root, tta=args.tta,
        threshold=args.threshold, tune_threshold=args.tune_threshold, out_dir=args.out, device=args.device,
        batch_size=args.batch_size, num_workers=args.num_workers, use_ema=not args.no_ema,
        gradcam=args.gradcam, gradcam_layer=args.gradcam_layer, show_progress=not args.no_progress,
        subset=args.subset, calibrate=args.calibrate, bootstrap=args.bootstrap, seed=args.seed,
        gate_masks=args.gate_masks, spacing=args.spacing, data_format=args.data_format, class_map=class_map,
        data_opts=args.layout, runtime=args.runtime, precision=args.precision)
    run_dir = Path(checkpoint).resolve().parent
    if args.out is not None or not run_dir.is_dir():  # written outside the run (or no run: run_test says so)
        run_test(options)
        return 0
    # the report goes into the run directory: refuse while another process (a training) writes there
    with run_lock(run_dir, "test.py", hint="or pass --out DIR to write outside the run"):
        run_test(options)
    return 0


if __name__ == "__main__":
    # CPU: large activations are reused instead of faulted in afresh at every batch (see utils/allocator.py)
    keep_freed_memory()
    sys.exit(run_main(main))
