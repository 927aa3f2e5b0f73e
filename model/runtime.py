"""A checkpoint as a predictor on the runtime of your choice: eager PyTorch, ONNX Runtime or TorchScript, fp32 or
INT8 (ONNX Runtime), with the call contract of the eager model in eval mode.

    from model.runtime import load_predictor
    predictor = load_predictor("runs/brisc/best.pth", runtime="onnxruntime")
    outputs = predictor(images)            # images (B, C, H, W), normalised -> {"cls": ..., "seg": ...}
    predictor.runtime, predictor.precision  # for reports: "onnxruntime", "fp32"

- Exported on first use into `<run>/exports/` (or `cache_dir`), then reused. The cache key holds the checkpoint's
  content hash, the EMA choice, the input-size policy, the runtime, the precision (and for static INT8 the
  calibration images), the opset, the torch / onnxruntime versions and a hash of the model package's source, so
  a changed checkpoint or model code exports afresh. Each export is compared with PyTorch once, on a square input
  at the training size and on a non-square one at another batch size (`model.export.check_inputs`); fp32 must
  agree within `atol` (1e-4, the export's tolerance), else `RuntimeMismatchError`. INT8 is checked and reported
  by `model.quantize` (its own, looser gate). The figures are kept in a JSON record beside the file.
- Batch size, height and width are dynamic in every exported file (a traced TorchScript module records the shape
  arithmetic; the ONNX file has dynamic axes), checked at a non-square size that is not a multiple of 32.
- Batching never hurts: a forward runs at most `pixel_budget` pixels (B x H x W) at once and splits larger
  batches into chunks (`predict_in_chunks`); outputs are identical to one big batch. Default on a CPU:
  DEFAULT_PIXEL_BUDGET = 2 x 512 x 512 pixels, i.e. batch 8 at 256 px, 2 at 512 px and 1 at 640 px (measured for
  EfficientMTNet on 2 threads: at 640 px batch 8 in one forward costs about 1.8x per image what batch 1 costs, at
  256 px batch 8 is cheaper per image). On a GPU there is no budget unless one is given.
- On a CPU the first forward calls `utils.allocator.keep_freed_memory()` (glibc keeps freed buffers up to 1 GiB
  for reuse instead of unmapping them), so a notebook gets the fast allocator without an entry point. The
  trade-off: process-wide and not undone; up to 1 GiB of freed memory stays with the process. `keep_memory=False`
  leaves glibc as it is.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from utils.checkpoint import config_of, read_checkpoint
from utils.errors import InputError

from . import export
from .export import RuntimeMismatchError, output_agreement  # noqa: F401 (part of this module's API)
from .loading import model_from_checkpoint
from .registry import model_tasks

RUNTIMES = ("torch", "onnxruntime", "torchscript")
PRECISIONS = ("fp32", "int8-dynamic", "int8-static")
FORMAT_OF = {"onnxruntime": "onnx", "torchscript": "torchscript"}
EXPORT_ATOL = 1e-4  # fp32 exports reproduce PyTorch to about 1e-6 on these models
DEFAULT_PIXEL_BUDGET = 2 * 512 * 512
CACHE_VERSION = 2  # bump when what a cached file or its record holds changes (2: the record names the tasks)
Forward = Callable[[torch.Tensor], dict]


# ------------------------------------------------------------------------------------------ batching
def chunk_size(batch: int, height: int, width: int, pixel_budget: Optional[int]) -> int:
    """Images per forward under `pixel_budget` pixels (at least one image; all of them without a budget)."""
    if not pixel_budget:
        return batch
    return max(1, min(batch, pixel_budget // (height * width)))


def predict_in_chunks(forward: Forward, images: torch.Tensor, pixel_budget: Optional[int]) -> dict:
    """`forward(images)` with the batch split into chunks of at most `pixel_budget` pixels, outputs concatenated
    along the batch; one call when the batch fits. Every model here is per-image in eval mode (batch norm uses
    running statistics), so the outputs equal those of one big batch."""
    size = chunk_size(images.shape[0], images.shape[-2], images.shape[-1], pixel_budget)
    if size >= images.shape[0]:
        return forward(images)
    parts = [forward(chunk) for chunk in torch.split(images, size)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


# ------------------------------------------------------------------------------------------ the predictor
class Predictor(nn.Module):
    """An eval-mode model behind one runtime: `predictor(images) -> {"cls", "seg"}` (the run's tasks only).

    `runtime`, `precision`, `tasks`, `device`, `pixel_budget` and `info` (the export record: file, size, parity
    with PyTorch, whether it came from the cache) describe it for reports. Inference only: `train()` raises.
    Outputs come back on the input's device, as float32 tensors.
    """

    def __init__(self, forward: Forward, runtime: str, precision: str, tasks: Sequence[str],
                 device: torch.device, pixel_budget: Optional[int], keep_memory: bool = True,
                 net: Optional[nn.Module] = None, info: Optional[dict] = None) -> None:
        super().__init__()
        self._forward = forward
        self.net = net  # the eager model (runtime "torch"), a registered submodule so .to() and .parameters() work
        self.runtime, self.precision = runtime, precision
        self.tasks = tuple(tasks)
        self.device = torch.device(device)
        self.pixel_budget = pixel_budget
        self.keep_memory = keep_memory
        self.info = dict(info or {})
        self.training = False

    def train(self, mode: bool = True) -> "Predictor":
        if mode:
            raise InputError(f"a {self.runtime} predictor is for inference only; train the eager model instead")
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        if self.keep_memory and self.device.type == "cpu":
            from utils.allocator import keep_freed_memory

            keep_freed_memory()  # idempotent; see the module notes for the trade-off
        outputs = predict_in_chunks(self._forward, images, self.pixel_budget)
        return {task: outputs[task] for task in self.tasks}

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, precision={self.precision}, tasks={self.tasks}, device={self.device}"


def _eager_forward(model: nn.Module, tasks: Sequence[str]) -> Forward:
    def forward(images: torch.Tensor) -> dict:
        out = model(images)
        return {task: out[task].float() for task in tasks}

    return forward


def _onnx_forward(path: Path, tasks: Sequence[str], device: torch.device, threads: int) -> Forward:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(f"runtime 'onnxruntime' on {device}: this onnxruntime build has no CUDA provider "
                             "(install onnxruntime-gpu) ; use device='cpu' or runtime 'torch' / 'torchscript'")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # ONNX Runtime's threads spin between the operators of a call (faster than sleeping: 2.0 against 2.4 ms at
    # 128 px, batch 1) but otherwise go on spinning after it, holding the cores that the decoding, mask
    # upsampling and PNG writing around the call need (0.4 -> 4 ms for them): stop when the call returns
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = [output.name for output in session.get_outputs()]

    def forward(images: torch.Tensor) -> dict:
        arrays = session.run(names, {export.INPUT_NAMES[0]: images.detach().float().cpu().contiguous().numpy()})
        return {name: torch.from_numpy(array).to(images.device) for name, array in zip(names, arrays)}

    return forward


def _torchscript_forward(path: Path, tasks: Sequence[str], device: torch.device) -> Forward:
    with warnings.catch_warnings():
        export._quiet_export_notices()
        module = torch.jit.load(str(path), map_location=device).eval()
        if device.type == "cpu":
            # conv-BN-activation fusion and MKL-DNN layouts (the file is frozen already); not savable, so per load
            module = torch.jit.optimize_for_inference(module)

    def forward(images: torch.Tensor) -> dict:
        with warnings.catch_warnings():
            export._quiet_export_notices()
            produced = module(images.to(device).float().contiguous())
        return {name: value.float().to(images.device) for name, value in zip(tasks, produced)}

    return forward


def forward_as_runner(forward: Forward, tasks: Sequence[str]) -> export.Runner:
    """A runtime forward as `model.export`'s runner (numpy outputs in the order of `tasks`), to compare."""
    return lambda image: tuple(forward(image)[task].detach().cpu().numpy() for task in tasks)


# ------------------------------------------------------------------------------------------ the cache
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_code_hash() -> str:
    """The model package's source: a change in how a model computes invalidates its exports."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(checkpoint: Path, runtime: str, precision: str, use_ema: bool, image_size: int,
              calibration_key: Optional[str] = None) -> dict:
    """Everything an export depends on; the file name carries a hash of it."""
    import onnxruntime

    return {"cache_version": CACHE_VERSION, "checkpoint_sha256": _sha256(checkpoint), "use_ema": use_ema,
            "runtime": runtime, "precision": precision, "opset": export.DEFAULT_OPSET,
            "input_policy": f"dynamic batch, height and width; traced at {image_size}x{image_size}",
            "calibration": calibration_key, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "model_code": _model_code_hash()}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _export_checked(model: nn.Module, cfg, path: Path, fmt: str, tasks: Sequence[str], atol: float) -> dict:
    """Export `model` to `path` (written under a temporary name, renamed once it reproduces PyTorch)."""
    size = cfg.data.preprocess.image_size
    inputs = export.check_inputs(cfg.data.preprocess.in_channels, size, size, 1, dynamic=True)
    pending = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        export.export_model(model, pending, fmt, inputs[0], True, metadata=export.deployment_metadata(cfg),
                            outputs=tasks)
        difference = export.check_export(export.load_runner(pending, fmt), model, inputs, atol, fmt, tasks)
    except export.ExportError as exc:
        pending.unlink(missing_ok=True)
        if "does not reproduce" in str(exc):
            raise RuntimeMismatchError(str(exc)) from exc
        raise
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, path)
    return {"max_abs_diff": difference, "atol": atol, "checked_on": [list(x.shape) for x in inputs]}


def _write_record(path: Path, record: dict) -> None:
    pending = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pending.write_text(json.dumps(record, indent=1))
    os.replace(pending, path)


def _remove_stale(folder: Path, prefix: str, keep: str) -> None:
    """Earlier exports of the same checkpoint, runtime, precision and weights (another key): superseded."""
    pattern = re.compile(rf"{re.escape(prefix)}-[0-9a-f]{{12}}")
    for old in folder.glob(f"{prefix}-*"):
        name = old.name.split(".", 1)[0]
        if pattern.fullmatch(name) and name != keep:
            old.unlink(missing_ok=True)


def exported_file(checkpoint: Path, eager_model: Callable[[], nn.Module], cfg, runtime: str, precision: str,
                  use_ema: bool, cache_dir: Path, atol: float, calibration=None) -> tuple[Path, dict]:
    """The cached file for this checkpoint, runtime and precision (exported and checked when missing) and its
    record (the key, the tasks, the parity figures, the file size, `cached`). `eager_model()` builds the
    checkpoint's eager model; it is called only to export (a cached file needs no model)."""
    fmt = FORMAT_OF[runtime]
    calibration_key = getattr(calibration, "key", None) if precision == "int8-static" else None
    if precision == "int8-static" and calibration is not None and calibration_key is None:
        calibration = list(calibration)  # plain tensors: their content is the key
        content = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in calibration))
        calibration_key = content.hexdigest()[:16]
    key = cache_key(checkpoint, runtime, precision, use_ema, cfg.data.preprocess.image_size, calibration_key)
    # raw and EMA weights of one checkpoint are separate files, so alternating between them does not re-export
    prefix = f"{checkpoint.stem}-{runtime}-{precision}{'' if use_ema else '-raw'}"
    name = f"{prefix}-{_digest(key)}"
    path, record_path = cache_dir / f"{name}{export.FORMATS[fmt]}", cache_dir / f"{name}.json"
    if path.is_file() and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):  # a damaged record: export again rather than trust the file
            record = {}
        if record.get("key") == key and isinstance(record.get("tasks"), list):
            return path, dict(record, cached=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = eager_model()
    tasks = model_tasks(model)
    if precision == "fp32":
        parity = _export_checked(model, cfg, path, fmt, tasks, atol)
    else:
        from .quantize import quantize_checked

        fp32 = cache_dir / f".{name}-fp32{export.FORMATS[fmt]}"
        try:
            _export_checked(model, cfg, fp32, fmt, tasks, atol)
            parity = quantize_checked(fp32, path, model, cfg, tasks, precision, calibration)
        finally:
            fp32.unlink(missing_ok=True)
    record = {"key": key, "tasks": list(tasks), "file": path.name, "size_bytes": path.stat().st_size,
              "parity": parity}
    _write_record(record_path, record)
    _remove_stale(cache_dir, prefix, name)
    return path, dict(record, cached=False)


# ------------------------------------------------------------------------------------------ entry point
def check_runtime(runtime: str, precision: str) -> None:
    """Raise InputError for an unknown runtime or precision, or INT8 on another runtime than onnxruntime."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime '{runtime}' is not one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and runtime != "onnxruntime":
        raise InputError(f"precision '{precision}' runs on runtime 'onnxruntime' only (got runtime '{runtime}')")


def load_predictor(checkpoint: Union[str, Path], runtime: str = "torch", device: Union[str, torch.device] = "cpu",
                   use_ema: bool = True, precision: str = "fp32", cache_dir: Optional[Union[str, Path]] = None,
                   pixel_budget: Optional[int] = -1, threads: int = 0, keep_memory: bool = True,
                   atol: float = EXPORT_ATOL, calibration: Optional[Iterable[torch.Tensor]] = None,
                   loaded: Optional[dict] = None) -> Predictor:
    """The checkpoint's model behind `runtime` ('torch', 'onnxruntime', 'torchscript') at `precision` ('fp32';
    'int8-dynamic' / 'int8-static' with onnxruntime), on `device`.

    `cache_dir`: where exports are kept (default `<checkpoint's folder>/exports`). `pixel_budget`: pixels per
    forward (-1: DEFAULT_PIXEL_BUDGET on a CPU, none on a GPU; None or 0: never split). `threads`: ONNX Runtime's
    intra-op threads (0: torch's count). `calibration` (int8-static only): batches of normalised images, e.g.
    `datasets.calibration.TrainCalibration(checkpoint)` (a few hundred images of the run's training split); an
    object with a `key` attribute names itself in the cache key, plain tensors are hashed. `loaded`: the
    checkpoint's contents when the caller has read them already (`utils.checkpoint.read_checkpoint`). A cached
    export loads without building the eager model.
    Raises InputError for a runtime, precision or device that does not fit, CheckpointError for the checkpoint,
    RuntimeMismatchError when an export does not reproduce PyTorch.
    """
    check_runtime(runtime, precision)
    if precision == "int8-static" and calibration is None:
        raise InputError("precision 'int8-static' needs calibration images: pass calibration="
                         "datasets.calibration.TrainCalibration(checkpoint) (the run's training split)")
    checkpoint = Path(checkpoint)
    device = torch.device(device)
    if pixel_budget == -1:
        pixel_budget = DEFAULT_PIXEL_BUDGET if device.type == "cpu" else None
    ckpt = loaded if loaded is not None else read_checkpoint(checkpoint)
    cfg = config_of(ckpt, checkpoint)

    @functools.cache
    def eager_model() -> nn.Module:  # on the CPU; built only for runtime torch or to export
        return model_from_checkpoint(ckpt, checkpoint, "cpu", use_ema)[0]

    if runtime == "torch":
        model = eager_model().to(device)
        tasks = model_tasks(model)
        return Predictor(_eager_forward(model, tasks), runtime, precision, tasks, device, pixel_budget, keep_memory,
                         net=model, info={"file": checkpoint.name, "cached": False})
    folder = Path(cache_dir) if cache_dir is not None else checkpoint.parent / "exports"
    path, record = exported_file(checkpoint, eager_model, cfg, runtime, precision, use_ema, folder, atol,
                                 calibration)
    tasks = tuple(record["tasks"])
    if runtime == "onnxruntime":
        forward = _onnx_forward(path, tasks, device, threads)
    else:
        forward = _torchscript_forward(path, tasks, device)
    if not record["cached"] and runtime == "torchscript":
        # the optimised module that actually runs (fusion, MKL-DNN) against PyTorch, once per export
        size = cfg.data.preprocess.image_size
        inputs = export.check_inputs(cfg.data.preprocess.in_channels, size, size, 1, True)
        runner = forward_as_runner(forward, tasks)
        model = eager_model()
        try:
            record["parity"]["max_abs_diff_optimised"] = export.check_export(runner, model.to(device), [
                x.to(device) for x in inputs], atol, "optimised torchscript", tasks)
        except export.ExportError as exc:
            path.unlink(missing_ok=True)
            raise RuntimeMismatchError(str(exc)) from exc
    return Predictor(forward, runtime, precision, tasks, device, pixel_budget, keep_memory,
                     info=dict(record, path=str(path)))
