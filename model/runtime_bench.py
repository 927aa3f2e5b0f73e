"""Timing the predictors of `model.runtime`: one row per runtime x precision x batch size x image size, with
latency, throughput and the share of the machine's matrix-multiply peak (measured in the same run).

    from model.runtime_bench import runtime_table, markdown
    table = runtime_table("runs/brisc/best.pth", runtimes=("torch", "onnxruntime", "torchscript"),
                          precisions=("fp32", "int8-dynamic"), batch_sizes=(1, 8), sizes=(256, 512, 640))
    print(markdown(table))

Peak: the median rate of an n x n fp32 matrix product (n = 2048 on a CPU, 8192 on a GPU) on the same device and
threads, 2 n^3 FLOPs per product. A row's achieved rate is the model's FLOPs per image (FlopCounterMode's count of
convolutions and matrix products, at that size) times its throughput; its share of the peak says how far the
runtime is from what the hardware does on the friendliest workload (depthwise convolutions and element-wise
passes cannot reach it). INT8 rows are measured against the fp32 peak. Timings are medians of `repeats` calls
after `warmup` untimed ones, the batch sizes of one size taking turns call by call, on the predictor as a user
calls it (chunking included, see `pixel_budgets`).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from utils.errors import InputError

from .loading import load_model_from_checkpoint
from .runtime import PRECISIONS, RUNTIMES, chunk_size, load_predictor


def matmul_peak_gflops(device: Union[str, torch.device] = "cpu", size: Optional[int] = None, repeats: int = 5
                       ) -> float:
    """GFLOP/s of a large fp32 matrix product on `device` (median of `repeats` after one warm-up)."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device)
    b = torch.randn(n, n, generator=generator).to(device)
    times = []
    with torch.no_grad():
        for index in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:  # the first product is the warm-up
                times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _time(predictor, pool: torch.Tensor, batch_sizes: Sequence[int], warmup: int, repeats: int
          ) -> dict[int, list[float]]:
    """Milliseconds per call of `predictor` for each batch size, the batch sizes taking turns call by call (so a
    slow second of the machine hits each of them, not the one timed then); each call takes the next `batch`
    images of `pool` (cyclically): batch 1 reads as many distinct images over the calls as batch 8 reads at once.
    Repeating one image would keep it in the CPU cache and flatter batch 1 (measured: ~5 % at 640 px)."""
    from utils.flops import synchronize

    times: dict[int, list[float]] = {batch: [] for batch in batch_sizes}
    with torch.no_grad():
        for call in range(warmup + repeats):
            for batch in batch_sizes:
                start_index = (call * batch) % pool.shape[0]
                images = pool[start_index:start_index + batch]
                start = time.perf_counter()
                predictor(images)
                synchronize(images.device)
                if call >= warmup:
                    times[batch].append(1000 * (time.perf_counter() - start))
    return times


def runtime_table(checkpoint: Union[str, Path], runtimes: Sequence[str] = RUNTIMES,
                  precisions: Sequence[str] = ("fp32",), batch_sizes: Sequence[int] = (1, 8),
                  sizes: Sequence[int] = (256, 512, 640), device: Union[str, torch.device] = "cpu",
                  pixel_budgets: Sequence[Optional[int]] = (-1,), warmup: int = 3, repeats: int = 10,
                  threads: int = 0, calibration: Optional[Iterable[torch.Tensor]] = None,
                  cache_dir: Optional[Union[str, Path]] = None, peak_gflops: Optional[float] = None,
                  verbose: bool = False) -> dict:
    """Time every valid runtime x precision (INT8 with onnxruntime only) x pixel budget x size x batch size.

    `pixel_budgets`: the predictor's budget per forward (-1: its default; None: never split), to set the chunked
    path beside the unsplit one. `calibration`: images for int8-static (e.g. datasets.calibration.
    TrainCalibration); int8-static is skipped with a note without them. Returns {"peak_gflops", "environment",
    "rows": [{runtime, precision, pixel_budget, images_per_forward, size, batch, latency_ms, per_image_ms,
    throughput_img_s, gflop_per_image, achieved_gflops, peak_share, file_mb and max_abs_diff (exported runtimes)}],
    "notes": [...]}.
    """
    unknown = [r for r in runtimes if r not in RUNTIMES] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise InputError(f"runtime_table: unknown runtime/precision {', '.join(unknown)} "
                         f"(runtimes: {', '.join(RUNTIMES)}; precisions: {', '.join(PRECISIONS)})")
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device)
    peak = peak_gflops or matmul_peak_gflops(device)
    model, cfg, _ = load_model_from_checkpoint(checkpoint, "cpu")
    from utils.flops import flop_counter_flops

    gflop = {s: flop_counter_flops(model, torch.zeros(1, cfg.data.preprocess.in_channels, s, s)) / 1e9 for s in sizes}
    rows, notes = [], []
    for runtime in runtimes:
        for precision in precisions:
            if precision != "fp32" and runtime != "onnxruntime":
                continue  # INT8 is an onnxruntime precision
            if precision == "int8-static" and calibration is None:
                notes.append("int8-static skipped: no calibration images given")
                continue
            for budget in pixel_budgets:
                predictor = load_predictor(checkpoint, runtime, device, precision=precision, cache_dir=cache_dir,
                                           pixel_budget=budget, threads=threads, calibration=calibration)
                for size in sizes:
                    # one pool of distinct images per size; every batch size divides it
                    pool_size = math.lcm(*batch_sizes)
                    pool = torch.randn(pool_size, cfg.data.preprocess.in_channels, size, size,
                                       generator=torch.Generator().manual_seed(size)).to(device)
                    times = _time(predictor, pool, batch_sizes, warmup, repeats)
                    for batch in batch_sizes:
                        median_ms = statistics.median(times[batch])
                        per_image = median_ms / batch
                        rows.append({
                            "runtime": runtime, "precision": precision, "device": device.type,
                            "pixel_budget": predictor.pixel_budget,
                            "images_per_forward": chunk_size(batch, size, size, predictor.pixel_budget),
                            "size": size, "batch": batch, "latency_ms": median_ms, "per_image_ms": per_image,
                            "throughput_img_s": 1000.0 / per_image, "gflop_per_image": gflop[size],
                            "achieved_gflops": gflop[size] * 1000.0 / per_image,
                            "peak_share": gflop[size] * 1000.0 / per_image / peak, **_export_facts(predictor)})
                        if verbose:
                            print(f"  {runtime:11s} {precision:12s} {size:4d} px batch {batch:3d}: "
                                  f"{per_image:8.2f} ms/img")
    environment = {"device": device.type, "threads": torch.get_num_threads(), "warmup": warmup,
                   "repeats": repeats, "timing": "median latency of a predictor call; the batch sizes take turns call by call; "
                   "calls cycle through one pool of distinct images per size"}
    if hasattr(os, "getloadavg"):
        environment["load_average_1min"] = round(os.getloadavg()[0], 2)
    from utils.allocator import allocator_state

    environment["cpu_allocator"] = allocator_state()
    return {"peak_gflops": peak, "environment": environment, "rows": rows, "notes": notes}


def _export_facts(predictor) -> dict:
    """The exported file's size (MiB) and its largest output difference from PyTorch (fp32: the export check;
    INT8: the largest of the per-output logit differences); empty for eager PyTorch."""
    info = predictor.info
    if predictor.runtime == "torch" or "size_bytes" not in info:
        return {}
    parity = info.get("parity") or {}
    diffs = [value for key, value in parity.items() if key.endswith("max_abs_diff") and key != "max_abs_diff_optimised"]
    return {"file_mb": info["size_bytes"] / 2**20, "max_abs_diff": max(diffs) if diffs else None}


def markdown(table: dict) -> str:
    """The table as Markdown, with the peak and the setting in a line above it."""
    env = table["environment"]
    lines = [f"matmul peak {table['peak_gflops']:.1f} GFLOP/s (fp32, {env['device']}, {env['threads']} threads); "
             f"median of {env['repeats']} calls after {env['warmup']} warm-up; allocator: {env['cpu_allocator']}",
             "",
             "| Runtime | Precision | Size | Batch | Per forward | Latency (ms) | ms/img | img/s | GFLOP/img | "
             "Peak share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['runtime']} | {r['precision']} | {r['size']} | {r['batch']} | {r['images_per_forward']} "
                     f"| {r['latency_ms']:.2f} | {r['per_image_ms']:.2f} | {r['throughput_img_s']:.1f} | "
                     f"{r['gflop_per_image']:.2f} | {100 * r['peak_share']:.1f} % |")
    lines += [f"note: {note}" for note in table["notes"]]
    return "\n".join(lines)
