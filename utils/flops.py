"""Model cost: parameter counts, multiply-accumulates (thop) and FLOPs (FlopCounterMode), latency timing.

Two independent operation counts are kept side by side:

- `thop_macs`: thop's per-module multiply-accumulate (MAC) count, with rules added here for what thop does not
  see on its own: matrix products inside attention and NMF modules (written in functional code, not modules),
  GroupNorm and subclasses of layers thop knows (a LayerNorm subclass), and a corrected rule for transposed
  convolutions (thop charges them per output pixel x input channels, which overcounts a stride-2 up-convolution
  by the stride squared). FLOPs = 2 x MACs.
- `flop_counter_flops`: PyTorch's `torch.utils.flop_counter.FlopCounterMode`, which counts FLOPs of the matrix
  multiplications and convolutions (and attention kernels) dispatched to ATen, 2 per MAC; it does not count
  normalisation, activations or element-wise arithmetic, which thop partly does, so the two differ slightly.
  The fused CPU attention kernel (`F.scaled_dot_product_attention`, used by timm's ViT) is invisible to it, so
  the count runs attention on its reference kernel (about 1.2 GMACs of ViT-B/16's 23 at 256x256).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import platform
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

MacRule = Callable[[nn.Module, tuple, object], None]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Exact number of (distinct) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------- matmul MACs
def attention_macs(tokens: int, keys: int, dim: int, batch: int = 1) -> int:
    """MACs of softmax attention's two products, Q K^T and A V, summed over heads: 2 * B * N * N_kv * C."""
    return 2 * batch * tokens * keys * dim


def nmf_macs(dim: int, pixels: int, rank: int, steps: int, batch: int = 1) -> int:
    """MACs of the matrix products of NMF with multiplicative updates, as in `model.hamburger.nmf` + reconstruction.

    Initial coefficients X^T B (N D R); each step updates C (X^T B, B^T B, C (B^T B)) and then B (X C, C^T C,
    B (C^T C)); a final C update; the reconstruction B C^T (D N R).
    """
    ndr, r2 = pixels * dim * rank, (pixels + dim) * rank * rank
    return batch * ((2 * steps + 3) * ndr + (2 * steps + 1) * r2)


def _timm_attention(module: nn.Module, inputs: tuple, output: object) -> int:
    b, n, c = inputs[0].shape
    return attention_macs(n, n, c, b)


def _mit_attention(module: nn.Module, inputs: tuple, output: object) -> int:
    """SegFormer's efficient attention: keys and values come from a map reduced by `sr_ratio` in each direction."""
    x, height, width = inputs[0], int(inputs[1]), int(inputs[2])
    b, n, c = x.shape
    sr = module.sr_ratio
    keys = (height // sr) * (width // sr) if sr > 1 else n
    return attention_macs(n, keys, c, b)


def _matmul_modules() -> dict[type, Callable[[nn.Module, tuple, object], int]]:
    """Module classes with matrix products in their forward code, and each one's MAC formula."""
    rules: dict[type, Callable[[nn.Module, tuple, object], int]] = {}
    with contextlib.suppress(ImportError):
        from timm.layers.attention import Attention as TimmAttention
        rules[TimmAttention] = _timm_attention
    with contextlib.suppress(ImportError):
        from segmentation_models_pytorch.encoders.mix_transformer import Attention as MiTAttention
        rules[MiTAttention] = _mit_attention
    return rules


def _own_formula(module: nn.Module, inputs: tuple, output: object) -> int:
    return int(module.matmul_macs(inputs[0].shape))


# --------------------------------------------------------------------------------------------- thop
def _transposed_conv(module: nn.modules.conv._ConvTransposeNd, inputs: tuple, output: torch.Tensor) -> None:
    """Each input pixel scatters a (C_out / groups x kernel) patch: MACs = input elements x C_out/g x kernel."""
    kernel = module.weight[0, 0].numel()
    module.total_ops += inputs[0].numel() * (module.out_channels // module.groups) * kernel


def _subtree_ops(module: nn.Module, composite: set[type]) -> float:
    """thop's count for the children of `module` (thop stops descending at a module that has a rule)."""
    total = 0.0
    for child in module.children():
        ops = child._buffers.get("total_ops")
        total += float(ops) if ops is not None else 0.0
        if type(child) not in composite:
            total += _subtree_ops(child, composite)
    return total


def _with_matmuls(formula: Callable[[nn.Module, tuple, object], int], composite: set[type]) -> MacRule:
    """A thop rule for a module with its own matrix products: its children's MACs plus the formula's."""
    matmuls: dict[int, float] = {}

    def rule(module: nn.Module, inputs: tuple, output: object) -> None:
        matmuls[id(module)] = matmuls.get(id(module), 0.0) + formula(module, inputs, output)
        # total_ops accumulates over calls in thop; children's counts already include every call so far
        module.total_ops.fill_(_subtree_ops(module, composite) + matmuls[id(module)])

    return rule


def _thop():
    """thop's profile module, imported without its distutils deprecation warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module("thop.profile")  # the module: `thop.profile` is the function


def thop_rules(model: nn.Module) -> dict[type, MacRule]:
    """Custom thop rules for the module types found in `model`."""
    thop_profile = _thop()
    register_hooks, count_normalization = thop_profile.register_hooks, thop_profile.count_normalization

    formulas = _matmul_modules()
    # A module of the project that does its own matrix products states their count (`matmul_macs(input_shape)`).
    formulas.update({type(m): _own_formula for m in model.modules() if callable(getattr(m, "matmul_macs", None))})
    composite = set(formulas)
    rules: dict[type, MacRule] = {nn.GroupNorm: count_normalization}
    for kind in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        rules[kind] = _transposed_conv
    for module in model.modules():
        kind = type(module)
        if kind in rules or kind in register_hooks:
            continue
        if kind in formulas:
            rules[kind] = _with_matmuls(formulas[kind], composite)
            continue
        # subclasses of layers thop knows (e.g. a channels-first LayerNorm) count like their base class
        for base, rule in register_hooks.items():
            if base is not nn.Sequential and isinstance(module, base):
                rules[kind] = _transposed_conv if issubclass(kind, nn.modules.conv._ConvTransposeNd) else rule
                break
    return rules


def thop_macs(model: nn.Module, x: torch.Tensor) -> float:
    """thop MACs of one forward pass of `model` on `x` (in eval mode), with the rules of `thop_rules`."""
    # thop adds the root module's own count to its children's: a wrapper keeps a root with a rule counted once
    root = nn.Sequential(model).train(model.training)
    macs, _ = _thop().profile(root, inputs=(x,), custom_ops=thop_rules(model), verbose=False)
    return float(macs)


def model_cost(model: nn.Module, in_channels: int, image_size: int) -> dict[str, float]:
    """The one cost measurement of the project's tables: parameters and thop GMACs (batch 1, eval mode, at
    `image_size` x `image_size`); FLOPs = 2 x MACs."""
    x = torch.zeros(1, in_channels, image_size, image_size)
    return {"params": count_parameters(model), "gmacs": thop_macs(model.eval(), x) / 1e9}


def flop_counter_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (no autograd) counted by `torch.utils.flop_counter.FlopCounterMode`.

    Fused attention runs on its reference ("math") kernel here: that one is made of matrix products the counter
    sees, whereas the fused CPU kernel is not counted at all.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(x)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Mixed precision for `dtype` (float16 / bfloat16); fp32 when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int,
                 dtype: Optional[torch.dtype] = None) -> list[float]:
    """Wall-clock milliseconds of `repeats` forward passes on `x` after `warmup` untimed ones.

    Runs without autograd; the device is synchronised after each pass so that asynchronous CUDA work is
    included in its own timing.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = x.device
    times = []
    with torch.no_grad(), autocast_context(device, dtype):
        for _ in range(warmup):
            model(x)
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def time_train_step(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int,
                    dtype: Optional[torch.dtype] = None, num_classes: int = 4) -> list[float]:
    """Wall-clock milliseconds of `repeats` training steps on `x` after `warmup` untimed ones.

    A step is what the training loop does per batch: zero the gradients, forward in training mode, a loss
    (cross-entropy on ``cls`` plus BCE on ``seg`` and every ``aux`` output the model returns, with fixed random
    targets), backward and an AdamW step. The model is left in training mode with changed weights: time it last.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = x.device
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (x.shape[0],), generator=generator).to(device)
    masks = (torch.rand(x.shape[0], 1, *x.shape[-2:], generator=generator) > 0.9).float().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, dtype):
            out = model(x)
        # every output the model has: a segmentation-only model has no class logits
        loss = nn.functional.cross_entropy(out["cls"].float(), labels) if "cls" in out else x.new_zeros(())
        for logits in ([out["seg"]] if "seg" in out else []) + list(out.get("aux") or []):
            logits = nn.functional.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear")
            loss = loss + nn.functional.binary_cross_entropy_with_logits(logits, masks)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def latency_summary(times_ms: list[float], batch_size: int) -> dict[str, float]:
    """Median / min / mean latency per batch (ms) and throughput (images/s from the median)."""
    median = statistics.median(times_ms)
    return {
        "latency_ms": median,
        "latency_ms_min": min(times_ms),
        "latency_ms_mean": statistics.fmean(times_ms),
        "throughput_img_s": batch_size * 1000.0 / median,
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak memory allocated by tensors on a CUDA device since the last reset (MiB); None on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


# --------------------------------------------------------------------------------------------- environment
def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    env: dict[str, object] = {
        "device": "CUDA" if device.type == "cuda" else "CPU",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):  # other processes competing for the CPU make CPU timings unreliable
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env
