"""Compare EfficientMTNet with the comparison models: parameters, MACs / FLOPs, latency, throughput, memory.

    python benchmark.py                                   # every registered model, CPU or the GPU, 256x256
    python benchmark.py --models efficient_mtnet unet segformer --device cpu --threads 2 --batch-sizes 1
    python benchmark.py --device cuda --batch-sizes 1 32 --precision fp16 --channels-last --compile
    python benchmark.py --metrics "runs/*/*/test_test/metrics.json" --out results/
    python benchmark.py --models efficient_mtnet --device cpu --threads 2 --runtime onnxruntime torchscript
    python benchmark.py --models efficient_mtnet --device cpu --threads 2 --image-size 256 640 --batch-sizes 1 8
    python benchmark.py --models efficient_mtnet --device cpu --threads 2 --runtime onnxruntime torchscript \
        --runtime-precision fp32 int8-dynamic int8-static --image-size 256 512 640 --batch-sizes 1 8 \
        --checkpoint runs/brisc/latest/best.pth        # trained weights; int8-static calibrates on its train split

Every model is built by name from the registry (random weights, 4 classes, 3 input channels) and measured in
eval mode, so deep-supervision heads are neither run nor timed. Per model:

- params: exact count; MACs by thop (with rules for attention / NMF matrix products) and FLOPs = 2 x MACs;
  FLOPs by torch.utils.flop_counter.FlopCounterMode as a cross-check; all per image at batch 1, fp32, for
  each input size (--image-size takes several: one set of rows per size);
- latency: median wall time of one forward pass of a batch after warm-up, with device synchronisation, and
  that per image; throughput = batch / median latency; peak CUDA memory (max_memory_allocated; n/a on a CPU);
- on Linux the process first makes glibc keep freed buffers for reuse, as train.py and test.py do
  (utils/allocator.py; without it a batch whose activations exceed 32 MiB is page-faulted in afresh at every
  pass); --allocator default leaves glibc's settings, to measure the difference;
- efficiency ratio = (1 / params) normalised so the smallest model is 1.000; speed ratio = throughput
  normalised so the fastest model at the same input size, batch size, precision and runtime is 1.000;
- with --runtime onnxruntime / torchscript: per model the runtime x precision x size x batch table of
  `model.runtime_bench.runtime_table` (the predictors of test.py / the demo: exported, checked against PyTorch,
  batches chunked under the pixel budget; eager PyTorch beside them; latency, ms/img, img/s and the share of the
  fp32 matrix-multiply peak measured once in the same run), printed as Markdown and kept in benchmark.json
  (`runtime_tables`); the exported runtimes' rows also join the main table (CPU only). --runtime-precision adds
  INT8 (onnxruntime); --checkpoint times a trained run (its model) instead of random weights, and int8-static
  calibrates on its training split (random weights: on random images);
- with --metrics: the headline figures (evaluation.summary.HEADLINE_FIGURES) and two-class mIoU from test.py's
  metrics.json files, with
  the setting each was scored with (split, subset, resolution, threshold, TTA); files that differ in split,
  subset or resolution are refused, since their figures are not comparable.
- with --train-step: the median wall time of one training step (forward in training mode, loss, backward, AdamW
  step; `utils.flops.time_train_step`) per batch, and the step-time ratio to the fastest model at the same input
  size, batch size and precision (1.000 = fastest; 1.37 would be 37 % slower), for comparing training costs;
- a model without a segmentation output (classification only) is timed the same way; its loss is the
  cross-entropy alone;

Writes a Markdown table to stdout and benchmark.csv, benchmark.json, radar.png to --out; the environment
(device name, torch version, threads, precision, input and batch sizes, CPU allocator) is stored with the
numbers. (Somewhat over 400 lines: one entry point whose parts, measuring, ratios, the metrics join, the table,
the CSV and the radar, all read the same rows; this docstring is a tenth of it.)
"""
from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from utils.cli import RUNTIME_PRECISIONS, add_debug_flag, int_at_least, non_negative_int, positive_int, run_main
from utils.errors import UserError
from utils.runtime import select_device
from evaluation.conventions import check_comparable, setting_label, setting_of
from evaluation.summary import HEADLINE_FIGURES
from utils.tables import markdown_table

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# runtimes besides eager PyTorch ("torch") -> the model.export format they run
EXPORTED_RUNTIMES = {"onnxruntime": "onnx", "torchscript": "torchscript"}
# metrics.json key -> column label; values are fractions and are shown as percentages
# test.py figures joined from metrics.json: the headline figures and the published table's 2-class mIoU
METRIC_COLUMNS = {**{key: f"{label} %" for key, label in HEADLINE_FIGURES}, "miou_2class": "mIoU % (2-class)"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="registry names (default: every registered model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--image-size", type=int_at_least(32), nargs="+", default=[256],
                        help="square input sides in pixels (several: rows for each, e.g. 256 640)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1], help="batch sizes to time")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=sorted(PRECISIONS),
                        help="fp32, or autocast to fp16 / bf16")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and input")
    parser.add_argument("--compile", action="store_true", help="time the torch.compile'd model (compile in warm-up)")
    parser.add_argument("--runtime", nargs="+", default=["torch"], choices=["torch", *EXPORTED_RUNTIMES],
                        help="runtimes to time; the eager PyTorch (torch) rows are always there, onnxruntime and "
                             "torchscript add a row per model and batch size (fp32, CPU)")
    parser.add_argument("--runtime-precision", nargs="+", default=["fp32"], choices=list(RUNTIME_PRECISIONS),
                        help="precisions of the exported runtimes: fp32, int8-dynamic, int8-static (INT8: "
                             "onnxruntime only)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="with --runtime: time this run's exports (its model, trained weights) instead of random "
                             "weights; int8-static calibrates on its training split")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="GLOB",
                        help="test.py metrics.json files or glob patterns to join (accuracy, mIoU, Dice, F1)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="output folder")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed forward passes before timing")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed forward passes (the median is reported)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: leave the default)")
    parser.add_argument("--num-classes", type=int_at_least(2), default=4)
    parser.add_argument("--train-step", action="store_true",
                        help="also time a training step (forward, loss, backward, AdamW step) per batch")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="glibc malloc (Linux): 'keep' reuses freed buffers up to 1 GiB, as train.py and test.py "
                             "do (see utils/allocator.py); 'default' leaves glibc's settings, for comparison")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    args.image_size = list(dict.fromkeys(args.image_size))  # in the given order, once each
    if args.compile:
        args.warmup = max(args.warmup, 2)  # compilation happens in the first passes, never in a timed one
    return args


# --------------------------------------------------------------------------------------------- measuring
def measure_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per (image size, precision, batch size) for the model `name`, then the exported runtimes' rows."""
    from model import build_model
    from utils.flops import (flop_counter_flops, latency_summary, model_cost, peak_memory_mb, reset_peak_memory,
                             time_forward, time_train_step)

    torch.manual_seed(0)
    model = build_model(name, num_classes=args.num_classes, in_channels=3, deep_supervision=True).eval()
    with torch.no_grad():
        if "aux" in model(torch.randn(1, 3, 64, 64)):
            raise RuntimeError(f"model '{name}' returns deep-supervision outputs in eval mode; they would be timed")
    bases = {}  # per input size: what the operation counts depend on
    for size in args.image_size:
        cost = model_cost(model, 3, size)
        bases[size] = {"model": name, "params": cost["params"], "gmacs_thop": cost["gmacs"],
                       "gflops_flopcounter": flop_counter_flops(model, torch.randn(1, 3, size, size)) / 1e9,
                       "gflops_thop": 2 * cost["gmacs"]}

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    runner = torch.compile(model) if args.compile else model
    rows = []
    for size, precision, batch in itertools.product(args.image_size, args.precision, args.batch_sizes):
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
        row = dict(bases[size], image_size=size, batch_size=batch, precision=precision,
                   channels_last=args.channels_last, compiled=args.compile, runtime="torch")
        reset_peak_memory(device)
        try:
            times = time_forward(runner, x, args.warmup, args.repeats, PRECISIONS[precision])
        except torch.OutOfMemoryError:
            row.update(latency_ms=None, throughput_img_s=None, peak_memory_mb=None, note="out of memory")
            torch.cuda.empty_cache()
        else:
            row.update(latency_summary(times, batch), peak_memory_mb=peak_memory_mb(device))
        if args.train_step and row.get("latency_ms") is not None:  # last: a step changes the weights
            steps = time_train_step(runner, x, max(1, args.warmup // 2), args.repeats, PRECISIONS[precision],
                                    args.num_classes)
            row["train_step_ms"] = statistics.median(steps)
            runner.eval()
        rows.append(row)
        print(f"  {name:22s} {size:4d} px batch {batch:3d} {precision}: "
              f"{_fmt(row.get('latency_ms'), 2)} ms, {_fmt(row.get('throughput_img_s'), 1)} img/s"
              + (f", train step {_fmt(row.get('train_step_ms'), 1)} ms" if args.train_step else ""),
              file=sys.stderr)
    if set(args.runtime) & set(EXPORTED_RUNTIMES):
        rows += measure_runtimes(name, bases, args)
    del runner, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_runtimes(name: str, bases: dict, args: argparse.Namespace) -> list[dict]:
    """The runtime table of `name` (model.runtime_bench.runtime_table, kept in args.runtime_tables and printed),
    and its exported runtimes' rows for the main table. Random weights in a temporary run checkpoint, or
    --checkpoint when it holds this model."""
    from model.runtime_bench import runtime_table

    runtimes = list(dict.fromkeys(["torch", *args.runtime]))
    with tempfile.TemporaryDirectory(prefix="benchmark_runtime_") as folder:
        checkpoint, calibration = _runtime_checkpoint(name, args, Path(folder))
        try:
            table = runtime_table(checkpoint, runtimes, args.runtime_precision, args.batch_sizes, args.image_size,
                                  "cpu", warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                  calibration=calibration, cache_dir=Path(folder) / "exports",
                                  peak_gflops=args.peak_gflops)
        except UserError as exc:  # e.g. a model the exporter cannot handle: one model does not stop the benchmark
            print(f"warning: {name}: no runtime table: {exc}", file=sys.stderr)
            return [dict(bases[args.image_size[0]], image_size=args.image_size[0], batch_size=args.batch_sizes[0],
                         precision="fp32", runtime=runtime, latency_ms=None, throughput_img_s=None,
                         peak_memory_mb=None, note=str(exc)) for runtime in runtimes if runtime != "torch"]
    table["weights"] = str(checkpoint) if args.checkpoint is not None and checkpoint == args.checkpoint else "random"
    args.runtime_tables[name] = table
    rows = []
    for r in table["rows"]:
        if r["runtime"] == "torch":  # eager PyTorch has its own rows above
            continue
        rows.append(dict(bases[r["size"]], image_size=r["size"], batch_size=r["batch"], precision=r["precision"],
                         channels_last=False, compiled=False, runtime=r["runtime"], latency_ms=r["latency_ms"],
                         throughput_img_s=r["throughput_img_s"], peak_memory_mb=None, peak_share=r["peak_share"],
                         images_per_forward=r["images_per_forward"], max_abs_diff=r.get("max_abs_diff"),
                         file_mb=r.get("file_mb")))
    return rows


def _runtime_checkpoint(name: str, args: argparse.Namespace, folder: Path) -> tuple[Path, Optional[list]]:
    """(checkpoint, int8-static calibration images) for the runtime table of model `name`."""
    from model import build_model
    from model.loading import model_kwargs
    from utils.checkpoint import config_of, read_checkpoint
    from utils.config import Config, config_to_dict

    wants_static = "int8-static" in args.runtime_precision
    if args.checkpoint is not None:
        cfg = config_of(read_checkpoint(args.checkpoint), args.checkpoint)
        if cfg.model.name == name:
            from datasets.calibration import TrainCalibration

            return args.checkpoint, TrainCalibration(args.checkpoint) if wants_static else None
    cfg = Config()
    cfg.model.name, cfg.model.num_classes, cfg.data.preprocess.image_size = name, args.num_classes, args.image_size[0]
    torch.manual_seed(0)
    model = build_model(name, **model_kwargs(cfg, pretrained=False))
    path = folder / f"{name}.pth"
    torch.save({"format_version": 1, "model_name": name, "config": config_to_dict(cfg), "model": model.state_dict(),
                "ema": None, "epoch": None, "class_counts": None}, path)
    generator = torch.Generator().manual_seed(0)  # random weights: random calibration images will do for timing
    calibration = [torch.randn(8, 3, args.image_size[0], args.image_size[0], generator=generator)
                   for _ in range(2)] if wants_static else None
    return path, calibration


def add_ratios(rows: list[dict]) -> None:
    """Efficiency ratio (fewest params = 1), compute ratio (fewest MACs at the same input size = 1), speed ratio
    (fastest at the same input size, batch size, precision and runtime = 1) and training-step ratio (fastest
    step at the same input size, batch size and precision = 1)."""
    fewest = min(r["params"] for r in rows)
    for r in rows:
        size = r.get("image_size")
        least_compute = min(g["gmacs_thop"] for g in rows if g.get("image_size") == size)
        r["efficiency_ratio"] = fewest / r["params"]
        r["compute_ratio"] = least_compute / r["gmacs_thop"] if r["gmacs_thop"] > 0 else None
        group = [g["throughput_img_s"] for g in rows
                 if _speed_group(g) == _speed_group(r) and g.get("throughput_img_s")]
        r["speed_ratio"] = r["throughput_img_s"] / max(group) if r.get("throughput_img_s") else None
        steps = [g["train_step_ms"] for g in rows if _speed_group(g)[:3] == _speed_group(r)[:3]
                 and g.get("train_step_ms")]
        if r.get("train_step_ms"):
            r["train_step_ratio"] = r["train_step_ms"] / min(steps)


def _speed_group(row: dict) -> tuple:
    return row.get("image_size"), row["batch_size"], row["precision"], row.get("runtime", "torch")


# --------------------------------------------------------------------------------------------- metrics
def load_metrics(patterns: list[str]) -> dict[str, dict[str, float]]:
    """{registry name: {metric: value}} from test.py metrics.json files (later files win for the same model)."""
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if Path(pattern).is_file() else [])
        if not matched:
            print(f"warning: --metrics {pattern!r} matches no file", file=sys.stderr)
        paths += matched
    if not paths:
        raise UserError("no metrics.json file found for --metrics; check the paths or quote the glob")
    found: dict[str, dict[str, float]] = {}
    settings: dict[str, dict] = {}
    for path in sorted(set(paths), key=lambda p: Path(p).stat().st_mtime):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"warning: skipping {path}: not readable JSON ({exc})", file=sys.stderr)
            continue
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str):
            print(f"warning: skipping {path}: no 'model' key naming the registry model", file=sys.stderr)
            continue
        setting = setting_of(data)
        if name in found:
            print(f"warning: several metrics files for '{name}'; using the newest, {path} "
                  f"({setting_label(setting)}; the older one: {found[name]['test_setting']})", file=sys.stderr)
        found[name] = {k: float(data[k]) for k in METRIC_COLUMNS
                       if isinstance(data.get(k), (int, float)) and math.isfinite(data[k])}
        found[name]["metrics_file"] = path  # type: ignore[assignment]
        found[name]["test_setting"] = setting_label(setting)  # type: ignore[assignment]
        settings[name] = setting
    try:  # figures of another split, subset or resolution convention never share a column unmarked
        check_comparable(list(settings.values()), list(settings))
    except ValueError as exc:
        raise UserError(f"--metrics: {exc}") from None
    return found


def join_metrics(rows: list[dict], metrics: dict[str, dict[str, float]]) -> None:
    names = {r["model"] for r in rows}
    for name in sorted(set(metrics) - names):
        print(f"warning: metrics for '{name}' ignored: the model is not in this benchmark", file=sys.stderr)
    for r in rows:
        r.update(metrics.get(r["model"], {}))


# --------------------------------------------------------------------------------------------- reporting
def _fmt(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else str(value)


def render_table(rows: list[dict], env: dict, with_metrics: bool) -> str:
    header = ["Model", "Params (M)", "Input px", "GMACs (thop)", "GFLOPs (2xMACs)", "GFLOPs (FlopCounterMode)",
              "Batch", "Precision", "Runtime", "Latency ms (median)", "ms / image", "Throughput img/s",
              "Peak mem MiB", "Efficiency ratio", "Speed ratio"]
    with_steps = any(r.get("train_step_ms") for r in rows)
    if with_steps:
        header += ["Train step ms (median)", "Train step ratio"]
    if with_metrics:
        header += list(METRIC_COLUMNS.values()) + ["Test setting"]
    setting = [f"Benchmark on {env['device']}: {env['device_name']}", f"torch {env['torch']}",
               f"{env['torch_threads']} CPU threads",
               "input " + ", ".join(f"{size}x{size}" for size in env["image_sizes"]),
               f"precision {', '.join(env['precision'])}"]
    setting += ["channels_last"] * bool(env["channels_last"]) + ["torch.compile"] * bool(env["compiled"])
    if env.get("onnxruntime"):
        setting.append(f"onnxruntime {env['onnxruntime']} (CPU provider)")
    if env.get("cpu_allocator"):
        setting.append(f"CPU allocator: {env['cpu_allocator']}")
    if env.get("load_average_1min") is not None:
        setting.append(f"load average {env['load_average_1min']} at start")
    lines = [
        " | ".join(setting),
        "MACs / FLOPs per image (batch 1, fp32); latency per batch, median of "
        f"{env['repeats']} runs after {env['warmup']} warm-up runs.",
        "",
    ]
    cells_of = []
    for r in rows:
        per_image = r["latency_ms"] / r["batch_size"] if r.get("latency_ms") is not None else None
        cells = [r["model"], _fmt(r["params"] / 1e6, 3), str(r.get("image_size", "n/a")), _fmt(r["gmacs_thop"], 3),
                 _fmt(r["gflops_thop"], 3), _fmt(r["gflops_flopcounter"], 3), str(r["batch_size"]), r["precision"],
                 r.get("runtime", "torch"), _fmt(r.get("latency_ms"), 2), _fmt(per_image, 2),
                 _fmt(r.get("throughput_img_s"), 1), _fmt(r.get("peak_memory_mb"), 1), _fmt(r["efficiency_ratio"], 3),
                 _fmt(r.get("speed_ratio"), 3)]
        if with_steps:
            cells += [_fmt(r.get("train_step_ms"), 1), _fmt(r.get("train_step_ratio"), 3)]
        if with_metrics:
            cells += [_fmt(100 * r[k], 2) if k in r else "n/a" for k in METRIC_COLUMNS]
            cells.append(r.get("test_setting", "n/a"))
        cells_of.append(cells)
    return "\n".join(lines + [markdown_table(header, cells_of, align=["l"] + ["r"] * (len(header) - 1))])


def runtime_tables_markdown(tables: dict) -> str:
    """Each model's runtime x precision x size x batch table (model.runtime_bench.markdown) under a heading."""
    from model.runtime_bench import markdown

    parts = []
    for name, table in tables.items():
        weights = "random weights" if table["weights"] == "random" else f"weights of {table['weights']}"
        parts.append(f"Runtimes of {name} ({weights}; predictors as test.py and the demo run them):\n\n"
                     f"{markdown(table)}")
    return "\n\n".join(parts)


def write_csv(rows: list[dict], env: dict, path: Path) -> None:
    env_cols = {f"env_{k}": v for k, v in env.items() if not isinstance(v, (list, dict))}
    records = [dict(r, **env_cols) for r in rows]
    fields: list[str] = []
    for record in records:
        fields += [k for k in record if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def draw_radar(rows: list[dict], path: Path, with_metrics: bool) -> None:
    """One polygon per model on 0..1 axes: the test metrics (with --metrics) and the efficiency figures.

    Speed uses the first batch size and precision of the run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first = _speed_group(rows[0])
    shown = [r for r in rows if _speed_group(r) == first]
    axes = [(k, label.replace(" %", "")) for k, label in METRIC_COLUMNS.items()] if with_metrics else []
    axes += [("efficiency_ratio", "Efficiency\n(1/params)"), ("compute_ratio", "Compute\n(1/GMACs)"),
             ("speed_ratio", f"Speed\n(img/s, batch {first[0]})")]
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(7.5, 7.5), subplot_kw={"polar": True})
    for r in shown:
        values = [r.get(k) or 0.0 for k, _ in axes]
        ax.plot(angles + angles[:1], values + values[:1], linewidth=1.8, label=r["model"])
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([label for _, label in axes])
    ax.set_ylim(0, 1.0)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    title = "Test metrics and efficiency" if with_metrics else "Efficiency"
    ax.set_title(f"{title}: 1.0 = best in the table ({shown[0]['precision']}, {shown[0]['image_size']} px)", pad=24)
    ax.legend(loc="upper right", bbox_to_anchor=(1.32, 1.1), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------- entry point
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from model import check_model_name, list_models
    from utils.allocator import allocator_state, keep_freed_memory
    from utils.flops import environment
    from utils.runs import write_json_atomic

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = select_device(args.device, key="--device")
    names = args.models or list_models()
    for name in names:
        check_model_name(name, key="--models")
    if set(args.runtime_precision) - {"fp32"} and "onnxruntime" not in args.runtime:
        raise UserError(f"--runtime-precision {' '.join(sorted(set(args.runtime_precision) - {'fp32'}))} runs on "
                        "ONNX Runtime only: add --runtime onnxruntime")
    if device.type != "cpu" and set(args.runtime) - {"torch"}:
        raise UserError(f"--runtime {' '.join(sorted(set(args.runtime) - {'torch'}))} times exported files on "
                        "the CPU; use --device cpu")
    if device.type == "cpu" and "fp16" in args.precision:
        print("warning: fp16 autocast on a CPU is slow and not representative; bf16 is the CPU's mixed precision",
              file=sys.stderr)
    metrics = load_metrics(args.metrics) if args.metrics else {}
    if args.allocator == "keep":  # before the first model: every timed pass then reuses the memory of the last
        keep_freed_memory()

    env = environment(device)
    env.update(image_sizes=args.image_size, batch_sizes=args.batch_sizes, precision=args.precision,
               channels_last=args.channels_last, compiled=args.compile, warmup=args.warmup, repeats=args.repeats,
               runtimes=list(dict.fromkeys(["torch", *args.runtime])))
    if device.type == "cpu":
        env["cpu_allocator"] = allocator_state()
    if "onnxruntime" in args.runtime:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    busy = env.get("load_average_1min")
    if device.type == "cpu" and busy is not None and busy + torch.get_num_threads() > (env["cpu_count"] or 1) + 0.5:
        advice = "a quiet machine" if torch.get_num_threads() == 1 else "--threads 1 or a quiet machine"
        print(f"warning: load average {busy} with {torch.get_num_threads()} threads on {env['cpu_count']} cores: "
              f"CPU timings will be slowed by other processes (use {advice})", file=sys.stderr)
    args.runtime_tables, args.peak_gflops = {}, None
    if set(args.runtime) & set(EXPORTED_RUNTIMES):
        from model.runtime_bench import matmul_peak_gflops

        args.peak_gflops = env["matmul_peak_gflops"] = matmul_peak_gflops("cpu")  # once, shared by every table
    rows: list[dict] = []
    for name in names:
        rows += measure_model(name, args, device)
    add_ratios(rows)
    join_metrics(rows, metrics)
    with_metrics = bool(metrics)

    args.out.mkdir(parents=True, exist_ok=True)
    print(render_table(rows, env, with_metrics))
    if args.runtime_tables:
        text = runtime_tables_markdown(args.runtime_tables)
        print(f"\n{text}")
        (args.out / "runtime_table.md").write_text(text + "\n", encoding="utf-8")
    write_csv(rows, env, args.out / "benchmark.csv")
    write_json_atomic({"environment": env, "rows": rows, "runtime_tables": args.runtime_tables},
                      args.out / "benchmark.json")
    draw_radar(rows, args.out / "radar.png", with_metrics)
    extra = f", {args.out / 'runtime_table.md'}" if args.runtime_tables else ""
    print(f"\nwrote {args.out / 'benchmark.csv'}, {args.out / 'benchmark.json'}, {args.out / 'radar.png'}{extra}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
