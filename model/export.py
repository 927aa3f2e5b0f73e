"""Export a checkpoint's inference path for other runtimes: an ONNX file or a TorchScript file.

    python -m model.export --checkpoint runs/<experiment>/<run>/best.pth --format onnx
    python -m model.export --checkpoint best.pth --format torchscript --out deploy/efficient_mtnet.pt
    python -m model.export --checkpoint best.pth --format onnx --no-dynamic --image-size 256 256 --opset 17

The file holds what `model.eval()` computes: image (B, C, H, W), normalised as in training -> class logits
(B, num_classes) and mask logits (B, 1, H, W) at the input size (threshold the sigmoid as test.py does);
deep-supervision heads are not part of it. Batch and image size are dynamic unless --no-dynamic fixes them.
After writing, the file is loaded back (ONNX Runtime's CPU provider for ONNX, torch.jit.load for TorchScript)
and its outputs are compared with PyTorch's on a non-square input at another batch size; an export that does
not reproduce them is deleted and reported. Then the file's size and its latency beside PyTorch's are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from utils.config import Config
from utils.cli import add_debug_flag, add_eval_flags, int_at_least, non_negative_int, positive_float, positive_int, run_main
from utils.errors import InputError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_OPSET = 17
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["cls", "seg"]
Runner = Callable[[torch.Tensor], tuple[np.ndarray, ...]]  # the outputs in the file's order (cls, seg)


class ExportError(RuntimeError):
    """An export that failed or whose file does not reproduce PyTorch's outputs."""


class InferencePath(nn.Module):
    """The model's eval-mode forward as a tuple (cls logits, seg logits): what other runtimes see.

    Exporters need tensors or tuples as outputs, not the dict of the model contract.
    """

    def __init__(self, model: nn.Module, outputs: Sequence[str] = tuple(OUTPUT_NAMES)) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)  # a single-task model exports its one output
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        return tuple(out[name] for name in self.outputs)


def _first_line(exc: Exception) -> str:
    """'Type: first line of the message': runtimes' messages run to many lines, errors here are one."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def _quiet_export_notices() -> None:
    """Silence the notices that TorchScript tracing (which both exports use) is deprecated in favour of
    torch.export, and its TracerWarnings about shape-dependent Python branches (whether the trace generalises
    is what the comparison with PyTorch on another shape checks); call inside `warnings.catch_warnings()`."""
    for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    warnings.filterwarnings("ignore", message=".*feature will be removed.*")


def deployment_metadata(cfg: Config) -> dict[str, str]:
    """What a runtime needs besides the graph: the preprocessing and the meaning of the outputs."""
    return {
        "model": cfg.model.name,
        "num_classes": str(cfg.model.num_classes),
        "image_size": str(cfg.data.preprocess.image_size),
        "in_channels": str(cfg.data.preprocess.in_channels),
        "mean": json.dumps(cfg.data.preprocess.mean),
        "std": json.dumps(cfg.data.preprocess.std),
        "preprocessing": "greyscale, resized to image_size, 0-1, repeated to in_channels, (x - mean) / std "
                         "(one channel: the averages of mean and std)",
        "threshold": str(cfg.eval.threshold),
        "outputs": "cls: class logits (B, num_classes); seg: mask logits (B, 1, H, W) at the input size; "
                   "mask = sigmoid(seg) >= threshold",
    }


def export_model(model: nn.Module, path: Path, fmt: str, example: torch.Tensor, dynamic: bool = True,
                 opset: int = DEFAULT_OPSET, metadata: Optional[dict[str, str]] = None,
                 outputs: Sequence[str] = tuple(OUTPUT_NAMES)) -> Path:
    """Write `model`'s inference path to `path` as `fmt` ('onnx' or 'torchscript'), traced on `example`;
    `outputs` names the output-dict entries the file returns, in order (the model's tasks).

    With `dynamic`, the ONNX file takes any batch size and image size; a traced TorchScript module always does
    (it records the shape arithmetic) and is frozen. `metadata` goes into the ONNX file's metadata_props or the
    TorchScript archive's extra file `metadata.json`. Raises ExportError when the exporter fails.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = InferencePath(model, outputs).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            _quiet_export_notices()
            if fmt == "onnx":
                every_axis = {"image": {0: "batch", 2: "height", 3: "width"}, "cls": {0: "batch"},
                              "seg": {0: "batch", 2: "height", 3: "width"}}
                axes = {k: v for k, v in every_axis.items() if k in ("image", *outputs)} if dynamic else None
                # dynamo=False: the TorchScript-based exporter; the torch.export one needs onnxscript
                torch.onnx.export(wrapped, (example,), str(path), dynamo=False, input_names=INPUT_NAMES,
                                  output_names=list(outputs), dynamic_axes=axes, opset_version=opset)
                if metadata:
                    import onnx

                    proto = onnx.load(str(path))
                    onnx.helper.set_model_props(proto, metadata)
                    onnx.save(proto, str(path))
            else:
                # freezing inlines the weights, folds batch norm into the convolutions and drops every
                # submodule the traced forward does not use (the deep-supervision heads)
                traced = torch.jit.freeze(torch.jit.trace(wrapped, (example,), check_trace=False).eval())
                torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(metadata or {})})
    except Exception as exc:  # an operator the exporter cannot express, an unsupported opset, ...
        path.unlink(missing_ok=True)
        raise ExportError(f"{fmt} export of {type(model).__name__} failed ({_first_line(exc)})") from exc
    return path


def load_runner(path: Path, fmt: str, threads: int = 0) -> Runner:
    """A function image tensor -> (cls, seg) numpy arrays that runs the exported file on the CPU.

    ONNX files run in ONNX Runtime's CPU provider with `threads` intra-op threads (0: torch's thread count).
    """
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        names = [output.name for output in session.get_outputs()]

        def run_onnx(image: torch.Tensor) -> tuple[np.ndarray, ...]:
            return tuple(session.run(names, {INPUT_NAMES[0]: image.detach().cpu().contiguous().numpy()}))

        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            _quiet_export_notices()
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run_torchscript(image: torch.Tensor) -> tuple[np.ndarray, ...]:
            with torch.no_grad():
                return tuple(output.numpy() for output in module(image.cpu()))

        return run_torchscript
    raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")


def max_difference(runner: Runner, model: nn.Module, image: torch.Tensor,
                   outputs: Sequence[str] = tuple(OUTPUT_NAMES)) -> float:
    """Largest absolute difference between the exported outputs and PyTorch's (`outputs`: cls, seg) on `image`."""
    with torch.no_grad():
        reference = model.eval()(image)
    produced = runner(image)
    worst = 0.0
    if len(produced) != len(outputs):
        raise ExportError(f"the exported file returns {len(produced)} outputs, expected {len(outputs)} "
                          f"({', '.join(outputs)})")
    for name, array in zip(outputs, produced):
        expected = reference[name].detach().cpu().float().numpy()
        if array.shape != expected.shape:
            raise ExportError(f"exported '{name}' has shape {array.shape}, PyTorch gives {expected.shape}")
        worst = max(worst, float(np.max(np.abs(array.astype(np.float64) - expected))))
    return worst


def check_export(runner: Runner, model: nn.Module, images: Sequence[torch.Tensor], atol: float,
                 fmt: str, outputs: Sequence[str] = tuple(OUTPUT_NAMES)) -> float:
    """Compare the exported outputs with PyTorch's on each image batch; ExportError beyond `atol`."""
    worst = 0.0
    for image in images:
        try:
            difference = max_difference(runner, model, image, outputs)
        except ExportError:
            raise
        except Exception as exc:  # the runtime rejects the input, e.g. a shape the file was not exported for
            raise ExportError(f"the {fmt} file failed on input {tuple(image.shape)} ({_first_line(exc)})") from exc
        if not difference <= atol:  # also catches NaN
            raise ExportError(f"the {fmt} file does not reproduce PyTorch on input {tuple(image.shape)}: max "
                              f"absolute difference {difference:.3g} > {atol:g}")
        worst = max(worst, difference)
    return worst


def check_inputs(in_channels: int, height: int, width: int, batch: int, dynamic: bool,
                 seed: int = 0) -> list[torch.Tensor]:
    """Random image batches to compare on: the export shape, and with `dynamic` a non-square one at another
    batch size (three quarters of the width, a multiple of 8 pixels that is not a multiple of 32)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, in_channels, height, width)]
    if dynamic:
        other_width = max(40, (3 * width // 4) // 32 * 32 + 8)
        shapes.append((batch + 1, in_channels, height, other_width))
    return [torch.randn(*shape, generator=generator) for shape in shapes]


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_flags(parser, ("checkpoint", "no_ema", "batch_size"), batch_default=1)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="file format to write")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default: next to the checkpoint, <name>.onnx or <name>.pt)")
    parser.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                        help="dynamic batch size and image size (default); --no-dynamic fixes them (ONNX only)")
    parser.add_argument("--opset", type=int_at_least(7), default=DEFAULT_OPSET, help="ONNX opset version (>= 7)")
    parser.add_argument("--image-size", type=int_at_least(32), nargs="+", default=None, metavar="PX",
                        help="H [W] of the example input, the fixed shape with --no-dynamic and the timed input "
                             "(default: the config's data.preprocess.image_size)")
    parser.add_argument("--atol", type=positive_float, default=1e-4, help="largest accepted difference from PyTorch")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads for PyTorch and ONNX Runtime (0: default)")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed runs before timing")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed runs (the median is reported)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.format == "torchscript" and not args.dynamic:
        parser.error("--no-dynamic applies to ONNX only: a traced TorchScript module takes any batch and image size")
    if args.image_size is not None and len(args.image_size) > 2:
        parser.error("--image-size takes H or H W, each >= 32 pixels")
    return args


def _size_text(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.1f} KiB"


def run_export(args: argparse.Namespace) -> dict:
    """Export, check and time as the command line asks; returns the figures it printed."""
    from utils.flops import latency_summary, time_forward

    from .loading import load_model_from_checkpoint

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, cfg, _ = load_model_from_checkpoint(args.checkpoint, "cpu", use_ema=not args.no_ema)
    height, width = (args.image_size * 2)[:2] if args.image_size else (cfg.data.preprocess.image_size,) * 2
    out = args.out or args.checkpoint.with_suffix(FORMATS[args.format])
    inputs = check_inputs(cfg.data.preprocess.in_channels, height, width, args.batch_size, args.dynamic)
    # written and checked under a temporary name, then renamed: a failed export neither leaves a file that
    # does not reproduce the model nor destroys an earlier good one at `out`
    pending = out.with_name(f".{out.stem}.tmp{os.getpid()}{out.suffix}")
    try:
        export_model(model, pending, args.format, inputs[0], args.dynamic, args.opset, deployment_metadata(cfg))
        runner = load_runner(pending, args.format, args.threads)
        difference = check_export(runner, model, inputs, args.atol, args.format)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, out)
    shapes = " and ".join("x".join(map(str, image.shape)) for image in inputs)
    print(f"wrote {out} ({args.format}, {'dynamic' if args.dynamic else 'fixed'} batch and image size, "
          f"{_size_text(out.stat().st_size)}); max |difference| from PyTorch {difference:.2g} on {shapes}")

    timed = inputs[0]
    torch_ms = latency_summary(time_forward(model, timed, args.warmup, args.repeats), args.batch_size)["latency_ms"]
    export_ms = latency_summary(time_forward(runner, timed, args.warmup, args.repeats), args.batch_size)["latency_ms"]
    runtime = "ONNX Runtime (CPU)" if args.format == "onnx" else "TorchScript"
    print(f"latency, batch {args.batch_size} at {height}x{width}, median of {args.repeats} runs on "
          f"{torch.get_num_threads()} CPU threads: PyTorch {torch_ms:.2f} ms, {runtime} {export_ms:.2f} ms")
    return {"path": str(out), "size_bytes": out.stat().st_size, "max_difference": difference,
            "pytorch_ms": torch_ms, "export_ms": export_ms}


def main(argv: Optional[list[str]] = None) -> int:
    """Export, check and time; a bad checkpoint or a failed export check is one line `error: ...` (run_main)."""
    args = parse_args(argv)
    try:
        run_export(args)
    except ExportError as exc:
        raise InputError(str(exc)) from exc
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))


class RuntimeMismatchError(ExportError):
    """An exported (or quantised) file whose outputs do not agree with PyTorch's within the tolerance."""


def output_agreement(reference: dict, produced: dict) -> dict:
    """How far `produced` is from `reference` (dicts of cls / seg logits): max |difference| per output, class
    agreement (same argmax) and mask agreement (same side of logit 0, i.e. probability 0.5), for reports."""
    figures: dict = {}
    for name in reference:
        a = reference[name].detach().float().cpu().numpy()
        b = produced[name].detach().float().cpu().numpy()
        figures[f"{name}_max_abs_diff"] = float(np.max(np.abs(a - b))) if a.size else 0.0
        if name == "cls":
            figures["class_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        else:
            figures["mask_pixel_agreement"] = float(np.mean((a >= 0) == (b >= 0)))
    return figures
