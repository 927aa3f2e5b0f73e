"""Figures for the README from the command line.

    python -m visualization compare --checkpoints runs/a/best.pth runs/b/best.pth [--split test] [--num 6]
    python -m visualization curves --run runs/<experiment>/<timestamp> [--out curves.png]
    python -m visualization architecture [--out images/architecture.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.cli import add_debug_flag, positive_int, run_main
from visualization.architecture import draw_architecture
from visualization.cases import compare_checkpoints
from visualization.curves import plot_training_curves


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visualization", description=__doc__.split("\n")[0])
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser("compare", help="qualitative grid: input, ground truth, prediction of each checkpoint")
    compare.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint files (in their run dirs)")
    compare.add_argument("--split", default="test", choices=["val", "test"])
    compare.add_argument("--data-root", default=None, help="dataset root replacing the checkpoints' data.root")
    compare.add_argument("--num", type=positive_int, default=6, help="number of cases (rows)")
    compare.add_argument("--out", default="images/comparison.png")
    compare.add_argument("--labels", nargs="+", default=None, help="column titles, one per checkpoint")
    compare.add_argument("--device", default="cpu")

    curves = sub.add_parser("curves", help="training curves from a run's history.json")
    curves.add_argument("--run", required=True, help="run directory (or its history.json)")
    curves.add_argument("--out", default=None, help="PNG path (default: <run>/curves.png)")

    arch = sub.add_parser("architecture", help="EfficientMTNet block diagram")
    arch.add_argument("--out", default="images/architecture.png")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        if args.labels is not None and len(args.labels) != len(args.checkpoints):
            parser.error(f"--labels: {len(args.labels)} labels for {len(args.checkpoints)} checkpoints")
        path = compare_checkpoints(args.checkpoints, args.out, args.split, args.data_root, args.num, args.labels,
                                   args.device)
    elif args.command == "curves":
        run = Path(args.run)
        out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "curves.png"
        path = plot_training_curves(run, out)
    else:
        path = draw_architecture(args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_main(main))
