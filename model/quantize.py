"""INT8 versions of an fp32 ONNX export through ONNX Runtime's quantisation tooling, compared with PyTorch.

- `int8-dynamic`: weights stored as int8, activations quantised on the fly per tensor at run time
  (`quantize_dynamic`; convolutions become ConvInteger). No calibration data.
- `int8-static`: weights (per channel) and activations (scales calibrated with MinMax on calibration images,
  `quantize_static`, QDQ format) int8. Calibration images: a few hundred of the run's training split
  (`datasets.calibration.TrainCalibration`), fed through a `CalibrationDataReader`.

Only convolutions and products with a weight (Conv, Gemm, MatMul by a constant) are quantised: products of two
activations stay fp32. In EfficientMTNet those are the Hamburger's NMF multiplicative updates, which divide by
data-dependent matrix products that int8 activations would wreck; they are a small share of the compute.

INT8 cannot reproduce fp32 to 1e-4, so the gate here is looser and coarse: every output finite, and the largest
logit difference at most INT8_MAX_RELATIVE_ERROR of the reference logits' range, on the check inputs
(calibration images when there are some, else random normalised images). Whether INT8 costs accuracy or Dice is a
question for a paired comparison on a held-out split, not for this gate; the figures it records (max difference,
class agreement, mask pixel agreement) are for reports.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from utils.errors import InputError

from . import export
from .export import RuntimeMismatchError, output_agreement

INT8_MAX_RELATIVE_ERROR = 0.25  # of the reference logits' range (max - min); a broken quantisation is far beyond
CHECK_BATCHES = 4  # calibration batches compared with PyTorch after quantising


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over batches of normalised images."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self._all = list(batches)
        self._batches = iter(self._all)

    def get_next(self) -> Optional[dict]:
        batch = next(self._batches, None)
        if batch is None:
            return None
        return {export.INPUT_NAMES[0]: batch.detach().float().cpu().contiguous().numpy()}

    def rewind(self) -> None:
        """Start again from the first batch (calibration methods that read the data twice)."""
        self._batches = iter(self._all)


def _quantisable_nodes(path: Path) -> tuple[list[str], list[str]]:
    """(names of the nodes to quantise, names kept fp32): convolutions and products with a weight (Conv, Gemm,
    MatMul by an initializer); products of two activations (NMF updates, attention) stay fp32."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {init.name for init in graph.initializer}
    keep, exclude = [], []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        has_weight = node.op_type != "MatMul" or any(name in weights for name in node.input)
        (keep if has_weight else exclude).append(node.name)
    return keep, exclude


def quantize_file(fp32_path: Path, out_path: Path, precision: str,
                  calibration: Optional[Iterable[torch.Tensor]] = None) -> dict:
    """Write the INT8 version of the fp32 ONNX file `fp32_path` to `out_path`; returns what was quantised."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_name(f".{out_path.stem}.prep{os.getpid()}.onnx")
    try:
        # shape inference and graph optimisation first, as onnxruntime's quantisation guide advises
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        nodes, excluded = _quantisable_nodes(prepared)
        if precision == "int8-dynamic":
            quantize_dynamic(str(prepared), str(out_path), nodes_to_quantize=nodes, weight_type=QuantType.QInt8,
                             per_channel=False)
            count = 0
        elif precision == "int8-static":
            batches = list(calibration or [])
            if not batches:
                raise InputError("int8-static calibration gave no images; check the run's split.json train part")
            count = sum(int(b.shape[0]) for b in batches)
            quantize_static(str(prepared), str(out_path), _Reader(batches), quant_format=QuantFormat.QDQ,
                            nodes_to_quantize=nodes, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        else:
            raise InputError(f"precision '{precision}' is not an INT8 precision (int8-dynamic, int8-static)")
    finally:
        prepared.unlink(missing_ok=True)
    return {"quantised_nodes": len(nodes), "fp32_nodes_kept": len(excluded), "calibration_images": count,
            "fp32_size_bytes": fp32_path.stat().st_size}


def quantize_checked(fp32_path: Path, out_path: Path, model: nn.Module, cfg, tasks: Sequence[str],
                     precision: str, calibration: Optional[Iterable[torch.Tensor]] = None) -> dict:
    """Quantise, then compare the INT8 file with PyTorch (`model`) on check inputs; the record's parity figures.

    Raises model.export.RuntimeMismatchError (and removes the file) when an output is not finite or differs by
    more than INT8_MAX_RELATIVE_ERROR of the reference range.
    """

    batches = list(calibration) if calibration is not None else None
    pending = out_path.with_name(f".{out_path.stem}.tmp{os.getpid()}{out_path.suffix}")
    try:
        figures = quantize_file(fp32_path, pending, precision, batches)
        if batches:
            inputs = list(itertools.islice(batches, CHECK_BATCHES))
            figures["checked_on"] = f"{sum(len(b) for b in inputs)} calibration images"
        else:
            inputs = export.check_inputs(cfg.data.preprocess.in_channels, cfg.data.preprocess.image_size,
                                         cfg.data.preprocess.image_size, 2, True)
            figures["checked_on"] = [list(x.shape) for x in inputs]
        runner = export.load_runner(pending, "onnx")
        reference = {name: [] for name in tasks}
        produced = {name: [] for name in tasks}
        with torch.no_grad():
            for image in inputs:
                expected = model.eval()(image)
                for name, array in zip(tasks, runner(image)):
                    # cls stays (B, K) for class agreement; seg is flattened (the check inputs differ in size)
                    flat = (lambda t: t.flatten(1)) if name == "cls" else (lambda t: t.flatten())
                    reference[name].append(flat(expected[name].float()))
                    produced[name].append(flat(torch.from_numpy(np.ascontiguousarray(array)).float()))
        reference = {k: torch.cat(v) for k, v in reference.items()}
        produced = {k: torch.cat(v) for k, v in produced.items()}
        figures.update(output_agreement(reference, produced))
        for name in tasks:
            span = float(reference[name].max() - reference[name].min()) or 1.0
            relative = figures[f"{name}_max_abs_diff"] / span
            figures[f"{name}_relative_error"] = relative
            if not torch.isfinite(produced[name]).all() or not relative <= INT8_MAX_RELATIVE_ERROR:
                raise RuntimeMismatchError(
                    f"the {precision} file does not reproduce PyTorch: '{name}' differs by up to "
                    f"{figures[f'{name}_max_abs_diff']:.3g} ({relative:.0%} of the logits' range, limit "
                    f"{INT8_MAX_RELATIVE_ERROR:.0%}); use precision fp32")
        os.replace(pending, out_path)
    finally:
        pending.unlink(missing_ok=True)
    figures["size_ratio_to_fp32"] = out_path.stat().st_size / figures["fp32_size_bytes"]
    return figures
