"""Train a model from a YAML experiment file.

    python train.py --config configs/demo.yaml
    python train.py --config configs/efficient_mtnet_brisc.yaml --opts train.epochs=50 data.root=/data/brisc2025
    python train.py --config configs/demo.yaml --resume auto
    torchrun --nproc_per_node=4 train.py --config configs/efficient_mtnet_brisc.yaml
"""
from __future__ import annotations

import argparse
import sys

from utils.allocator import keep_freed_memory
from utils.cli import add_debug_flag, run_main
from utils.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment file (see configs/)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=5 data.root=/data/brisc2025")
    parser.add_argument("--resume", default=None, metavar="auto|RUN_DIR|CHECKPOINT",
                        help="continue a run: 'auto' picks the latest run of this experiment")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train; a mistake in the config, data or checkpoint raises a `UserError` (printed by `run_main`)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.opts)
    from engine.loops import NonFiniteLossError  # heavy imports after the config is known to be valid
    from engine.resume import prepare_resume
    from engine.trainer import TrainingInterrupted, train
    from model import check_model_kwargs, check_model_name
    from utils.runtime import amp_dtype, select_device

    # Values that need the model registry or the machine, checked before anything is written.
    check_model_name(cfg.model.name)
    check_model_kwargs(cfg.model.name, cfg.model.kwargs)
    amp_dtype(cfg.train, select_device(cfg.train.device))
    resume = prepare_resume(args.resume, cfg, args.config, args.opts) if args.resume else None
    if resume is not None and resume.finished:
        return 0  # "nothing to resume" was printed with the run's final checkpoint
    try:
        run_dir = train(cfg, resume, show_progress=not args.no_progress, config_file=args.config)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return 130
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"run directory: {run_dir}")
    print(f"evaluate with: python test.py --checkpoint {run_dir / 'best.pth'}")
    return 0


if __name__ == "__main__":
    # CPU: large activations are reused instead of faulted in afresh at every batch (see utils/allocator.py)
    keep_freed_memory()
    sys.exit(run_main(main))
