"""What every entry point shares: one-line errors for the user's mistakes, and argument types with ranges.

    if __name__ == "__main__":
        sys.exit(run_main(main))

`run_main` calls `main(argv)` with `--debug` taken out of the arguments. A `UserError` (ConfigError,
DataError, CheckpointError, ...) or a missing file becomes `error: <message>` on stderr and exit status 2;
`--debug` or the environment variable EFFICIENT_MTNET_DEBUG=1 lets it raise with its full traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any, Callable, Optional, Sequence

from utils.errors import UserError

DEBUG_ENV = "EFFICIENT_MTNET_DEBUG"
DEBUG_HELP = f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
USER_ERROR_EXIT = 2


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_main(main: Callable[[Optional[list[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run an entry point's `main(argv)`; returns its exit status (0 when it returns something else than an int)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != "--debug"]
    try:
        result = main(args)
    except (UserError, FileNotFoundError) as exc:
        if debug:
            raise
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except OSError as exc:  # a full disk while writing a figure or a report: one line, not a traceback
        if debug or exc.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on the device while writing {exc.filename or 'a file'}; free some space "
              "and run the command again (files written before are intact)", file=sys.stderr)
        return USER_ERROR_EXIT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def user_message(exc: BaseException) -> str:
    """The message of a user error; one raised in a DataLoader worker comes back wrapped in the worker's
    traceback text ("Caught DataError in DataLoader worker ... Original Traceback ..."): keep its own message."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        kind = type(exc)
        for name in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
            if f"\n{name}" in text:
                return text.rsplit(f"\n{name}", 1)[1].strip()
    return text


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """List `--debug` in the help (run_main removes it from the arguments before the parser sees them)."""
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= `low`."""
    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def open_unit_float(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a probability threshold)."""
    value = float(_number(text, float))
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (e.g. a pixel spacing in mm)."""
    value = float(_number(text, float))
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


# The evaluation flags of test.py, `python -m evaluation.shift` and `python -m model.export`, declared once with
# their ranges; each entry point takes the ones that apply to it.
EVAL_FLAGS = ("checkpoint", "no_ema", "split", "data_root", "threshold", "tta", "device", "batch_size", "num_workers",
              "runtime", "precision")
RUNTIME_CHOICES = ("torch", "onnxruntime", "torchscript")  # model.runtime.RUNTIMES (not imported: torch-free CLI)
RUNTIME_PRECISIONS = ("fp32", "int8-dynamic", "int8-static")  # model.runtime.PRECISIONS


def add_eval_flags(parser: argparse.ArgumentParser, flags: Sequence[str] = EVAL_FLAGS, split_default: str = "test",
                   batch_default: Optional[int] = None, checkpoint_help: str = "best.pth / last.pth of a run",
                   checkpoint_required: bool = True) -> None:
    """Add the evaluation flags named in `flags` (a subset of EVAL_FLAGS), with their ranges, to `parser`."""
    from pathlib import Path

    unknown = set(flags) - set(EVAL_FLAGS)
    if unknown:
        raise ValueError(f"unknown evaluation flags {sorted(unknown)}; known: {', '.join(EVAL_FLAGS)}")
    declared = {
        "checkpoint": (("--checkpoint",), dict(required=checkpoint_required, type=Path, help=checkpoint_help)),
        "no_ema": (("--no-ema",), dict(action="store_true",
                                       help="use the raw weights even if EMA weights were saved")),
        "split": (("--split",), dict(default=split_default, choices=["test", "dev_test", "val", "train"],
                                     help="test: the release's test split (held out); dev_test: the held-out part "
                                          "of the training release (split.json, data.split.test_dev_fraction); val: the "
                                          "run's validation split (selection: it chose the checkpoint); default "
                                          f"{split_default}")),
        "data_root": (("--data-root",), dict(default=None, help="dataset root, if not the one the run trained on")),
        "threshold": (("--threshold",), dict(type=open_unit_float, default=None,
                                             help="segmentation threshold, between 0 and 1 (default: config)")),
        "tta": (("--tta",), dict(action="store_true", help="average the prediction with its horizontal flip")),
        "device": (("--device",), dict(default="auto", help="auto | cpu | cuda | cuda:N")),
        "batch_size": (("--batch-size",), dict(type=positive_int, default=batch_default,
                                               help=f">= 1 (default: {batch_default or 'config'})")),
        "num_workers": (("--num-workers",), dict(type=non_negative_int, default=None,
                                                  help=">= 0 (default: config); with --input: batches predicted at "
                                                       "once in threads (default: CPU count, at most 4)")),
        "runtime": (("--runtime",), dict(default=None, choices=RUNTIME_CHOICES,
                                         help="inference runtime: torch (eager), onnxruntime or torchscript, exported "
                                              "into <run>/exports on first use and checked against PyTorch "
                                              "(default: eval.runtime, torch; with --input: eval.predict_runtime, "
                                              "onnxruntime on a CPU; docs/runtime.md)")),
        "precision": (("--precision",), dict(default=None, choices=RUNTIME_PRECISIONS,
                                             help="fp32, or int8-dynamic / int8-static (onnxruntime only; static "
                                                  "calibrates on the run's training split) (default: "
                                                  "eval.runtime_precision, fp32)")),
    }
    for name in EVAL_FLAGS:
        if name in flags:
            names, options = declared[name]
            parser.add_argument(*names, **options)
