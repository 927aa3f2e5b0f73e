"""The README's results table, regenerated from runs: `test.py` outputs plus measured size, compute and latency.

    python -m evaluation.results runs/brisc_cpu/latest runs/mobilenetv2_unet_cpu/latest --split val
    python -m evaluation.results runs/*/latest --split val --readme README.md     # rewrite the README's table

Each run directory must hold `config.yaml`, `history.json` and `test_<split>/metrics.json` (written by
`python test.py --checkpoint RUN/best.pth --split <split>`). Nothing in the table is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from model import build_model
from model.loading import model_kwargs
from utils.cli import add_debug_flag, positive_int, run_main
from utils.config import load_config
from utils.errors import InputError
from utils.flops import latency_summary, thop_macs, time_forward

START, END = "<!-- results:start -->", "<!-- results:end -->"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure_model(cfg, threads: int, repeats: int = 30) -> dict:
    """Parameters, thop GMACs and CPU latency (batch 1, median) of the run's architecture at its image size."""
    model = build_model(cfg.model.name, **{**model_kwargs(cfg), "pretrained": None}).eval()
    size = cfg.data.image_size
    x = torch.randn(1, cfg.data.in_channels, size, size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        latency = latency_summary(time_forward(model, x, warmup=5, repeats=repeats), 1)["latency_ms"]
    finally:
        torch.set_num_threads(previous)
    return {"params": sum(p.numel() for p in model.parameters()), "gmacs": thop_macs(model, x) / 1e9,
            "latency_ms": latency}


def run_row(run_dir: Path, split: str, threads: int) -> dict:
    metrics_path = run_dir / f"test_{split}" / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} is missing: run python test.py --checkpoint {run_dir}/best.pth "
                                f"--split {split}")
    metrics = json.loads(metrics_path.read_text())
    cfg = load_config(run_dir / "config.yaml")
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
    command = (run_dir / "command.txt").read_text().splitlines()[0] if (run_dir / "command.txt").is_file() else ""
    row = {"run": str(run_dir), "name": cfg.model.name, "metrics": metrics, "cfg": cfg, "command": command,
           "epochs": len(history), "minutes": sum(r.get("time_s", 0.0) for r in history) / 60.0,
           "train_img_s": (sum(r.get("train_img_s", 0.0) for r in history) / len(history)) if history else 0.0}
    row.update(measure_model(cfg, threads))
    return row


def pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def render(rows: list[dict], split: str, threads: int) -> str:
    header = ("| model | params (M) | GMACs | CPU latency (ms) | accuracy | macro-F1 | Dice tumour | IoU tumour | "
              "Dice global | Dice 2-class | mIoU 2-class | epochs | train wall-clock (min) | train img/s |")
    lines = [header, "|" + "|".join(["---"] * 14) + "|"]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.3f} | {r['gmacs']:.3f} | {r['latency_ms']:.1f} | {pct(m.get('accuracy'))} "
            f"| {pct(m.get('f1_macro'))} | {pct(m.get('dice'))} | {pct(m.get('iou'))} | {pct(m.get('dice_global'))} "
            f"| {pct(m.get('dice_2class'))} | {pct(m.get('miou_2class'))} | {r['epochs']} | {r['minutes']:.1f} "
            f"| {r['train_img_s']:.0f} |")
    classes = ["glioma", "meningioma", "no_tumor", "pituitary"]
    per_class = ["", "Per class (" + split + " split): recall / F1, %", "",
                 "| model | " + " | ".join(classes) + " |", "|" + "|".join(["---"] * (len(classes) + 1)) + "|"]
    for r in rows:
        m = r["metrics"]
        cells = [f"{pct(m.get(f'recall_{c}'))} / {pct(m.get(f'f1_{c}'))}" for c in classes]
        per_class.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    first = rows[0]
    notes = [
        "",
        f"Data: `{first['metrics'].get('data_root')}`, the `{split}` split "
        f"({first['metrics'].get('num_images')} images; for `val`, the stratified 10 % of the BRISC 2025 training "
        f"split held out by `split.json`, the same for every row), at {first['cfg'].data.image_size}x"
        f"{first['cfg'].data.image_size}. Dice/IoU tumour: per image, mean over images with a tumour; global and "
        "2-class: from summed pixel counts (see [Metric definitions](#metric-definitions)).",
        f"Hardware: {cpu_name()}, {torch.get_num_threads()} cores visible; latency: batch 1, fp32, eval mode, "
        f"{threads} threads, median of 30 after warm-up, measured when this table was generated. GMACs: thop "
        "multiply-accumulates at the training resolution (FLOPs = 2 x MACs).",
        "Commands:",
    ]
    for r in rows:
        notes.append(f"- {r['name']}: `{r['command'] or 'python train.py --config ...'}` then "
                     f"`python test.py --checkpoint {r['run']}/best.pth --split {split}`")
    notes.append("")
    notes.append("Regenerate: `python -m evaluation.results " + " ".join(r["run"] for r in rows)
                 + f" --split {split} --readme README.md`")
    return "\n".join(lines + per_class + notes)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise InputError(f"{readme} has no '{START}' ... '{END}' block to replace")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text), encoding="utf-8")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (e.g. runs/brisc_cpu/latest)")
    parser.add_argument("--split", default="val", help="which test.py output to read: test_<split>/metrics.json")
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads for the latency measurement")
    parser.add_argument("--readme", type=Path, default=None, help="replace the README's results block")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    rows = [run_row(run, args.split, args.threads) for run in args.runs]
    table = render(rows, args.split, args.threads)
    print(table)
    if args.readme:
        update_readme(args.readme, table)
        print(f"\nupdated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
