"""The runtime an entry point predicts with (`--runtime`, `--precision`, or the run's `eval.runtime` /
`eval.runtime_precision`), built once as a `model.runtime.Predictor`, and how every report names it.

test.py, `test.py --input`, the shift benchmark and the web demo call `inference_predictor`; metrics.json,
shift.json and the console headers carry `runtime_record` / `runtime_label`, so a figure always says which
runtime and precision produced it and how closely its export reproduced PyTorch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from model.runtime import Predictor, check_runtime, load_predictor
from utils.config import ConfigError
from utils.errors import InputError


def chosen_runtime(cfg_eval, runtime: Optional[str], precision: Optional[str]) -> tuple[str, str]:
    """(runtime, precision): the flags when given, else the run's eval.runtime / eval.runtime_precision (a
    checkpoint saved before these keys existed: torch, fp32). One ConfigError for a combination that cannot run."""
    runtime = runtime or getattr(cfg_eval, "runtime", "torch")
    precision = precision or getattr(cfg_eval, "runtime_precision", "fp32")
    try:
        check_runtime(runtime, precision)
    except InputError as exc:
        raise ConfigError(f"--runtime {runtime} --precision {precision}: {exc}; use --runtime onnxruntime for "
                          "INT8, or --precision fp32") from None
    return runtime, precision


def prediction_runtime(cfg_eval, runtime: Optional[str], precision: Optional[str],
                       device: torch.device) -> tuple[str, str, bool]:
    """(runtime, precision, automatic) for prediction (`test.py --input`, the web demo): the flags when given,
    else eval.predict_runtime, whose `auto` (also for a checkpoint saved before the key existed) is onnxruntime
    on a CPU and eager torch on a GPU (INT8 precisions: onnxruntime). `automatic`: chosen by `auto`, so a
    failed export may fall back to eager PyTorch (`prediction_predictor`)."""
    precision = precision or getattr(cfg_eval, "runtime_precision", "fp32")
    automatic = runtime is None and getattr(cfg_eval, "predict_runtime", "auto") == "auto"
    if runtime is None:
        runtime = getattr(cfg_eval, "predict_runtime", "auto")
        if runtime == "auto":
            runtime = "onnxruntime" if device.type == "cpu" or precision != "fp32" else "torch"
    runtime, precision = chosen_runtime(cfg_eval, runtime, precision)
    return runtime, precision, automatic


def prediction_predictor(checkpoint: Union[str, Path], runtime: str, precision: str, automatic: bool,
                         device: Union[str, torch.device] = "cpu", use_ema: bool = True,
                         loaded: Optional[dict] = None, threads: int = 0) -> Predictor:
    """`inference_predictor`; when the runtime was chosen automatically and its export cannot be made here (no
    onnxruntime, a run folder that cannot be written, an export that disagrees with PyTorch), eager PyTorch
    with one line that says why. A runtime asked for by name fails with its own error instead. `loaded`: the
    checkpoint's contents, when read already; `threads`: ONNX Runtime's threads per call (0: torch's count)."""
    if not automatic or runtime == "torch":
        return inference_predictor(checkpoint, runtime, precision, device, use_ema, loaded=loaded, threads=threads)
    try:
        return inference_predictor(checkpoint, runtime, precision, device, use_ema, loaded=loaded, threads=threads)
    except (ImportError, OSError, RuntimeError, InputError) as exc:
        print(f"note: the {runtime} export is not available here ({type(exc).__name__}: {exc}); predicting with "
              "eager PyTorch instead (--runtime torch says so explicitly)", flush=True)
        return inference_predictor(checkpoint, "torch", "fp32", device, use_ema, loaded=loaded)


def inference_predictor(checkpoint: Union[str, Path], runtime: str, precision: str,
                        device: Union[str, torch.device] = "cpu", use_ema: bool = True,
                        data_root: Optional[str] = None, loaded: Optional[dict] = None,
                        threads: int = 0) -> Predictor:
    """The checkpoint behind `runtime` at `precision` (checked with `chosen_runtime` first), exported on first use
    into `<run>/exports`. int8-static calibrates on 256 images of the run's training split (`data_root`: where
    that data lives now, when it moved). `loaded`: the checkpoint's contents, when read already; `threads`:
    ONNX Runtime's threads per call (0: torch's count)."""
    calibration = None
    if precision == "int8-static":
        from datasets.calibration import TrainCalibration

        calibration = TrainCalibration(checkpoint, data_root=data_root)
    if runtime != "torch":
        print(f"runtime {runtime} ({precision}): loading the export of {Path(checkpoint).name} "
              "(exported and checked against PyTorch on first use)", flush=True)
    return load_predictor(checkpoint, runtime, device, use_ema=use_ema, precision=precision,
                          calibration=calibration, loaded=loaded, threads=threads)


def runtime_record(predictor: torch.nn.Module) -> dict:
    """For metrics.json / shift.json: runtime, precision and the export's record (file, size, parity with
    PyTorch, cached); `export` is None for eager PyTorch (a Predictor, or the eager model itself)."""
    runtime, precision = _described(predictor)
    info = getattr(predictor, "info", {})
    export = None
    if runtime != "torch":
        export = {"file": info.get("file"), "size_bytes": info.get("size_bytes"), "parity": info.get("parity"),
                  "cached": info.get("cached")}
    return {"runtime": runtime, "runtime_precision": precision, "runtime_export": export}


def runtime_label(predictor: torch.nn.Module) -> str:
    """One line for console headers, e.g. `runtime onnxruntime int8-dynamic (max |logit difference| from
    PyTorch 0.031, classes agree 100.0 %)` or `runtime torch fp32 (eager)`."""
    runtime, precision = _described(predictor)
    if runtime == "torch":
        return f"runtime torch {precision} (eager PyTorch)"
    parity = predictor.info.get("parity") or {}
    parts = []
    if "max_abs_diff" in parity:
        parts.append(f"max |difference| from PyTorch {parity['max_abs_diff']:.2g} (limit {parity.get('atol', 0):.0e})")
    for task in ("cls", "seg"):
        if f"{task}_max_abs_diff" in parity:
            parts.append(f"{task} max |logit difference| from PyTorch {parity[f'{task}_max_abs_diff']:.3g}")
    for key, label in (("class_agreement", "classes agree"), ("mask_pixel_agreement", "mask pixels agree")):
        if isinstance(parity.get(key), (int, float)):
            parts.append(f"{label} {100 * parity[key]:.1f} %")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"runtime {runtime} {precision}{detail}"


def _described(predictor: torch.nn.Module) -> tuple[str, str]:
    """(runtime, precision) of a Predictor; the eager model itself is torch / fp32."""
    return getattr(predictor, "runtime", "torch"), getattr(predictor, "precision", "fp32")
