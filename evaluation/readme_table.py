"""The README's results table, regenerated from runs: `test.py` outputs plus measured size, compute and latency.

    python -m evaluation.readme_table runs/brisc_cpu/latest runs/mobilenetv2_unet_cpu/latest --split val
    python -m evaluation.readme_table runs/*/latest --split test --readme README.md    # rewrite the README's table
    python -m evaluation.readme_table runs/*/latest --folder test_test_tta             # another test.py setting

Each run directory must hold `config.yaml`, `history.json` and `test_<split>/metrics.json` (written by
`python test.py --checkpoint RUN/best.pth --split <split>`; other settings write other folders, chosen with
`--folder`). Nothing in the table is typed by hand. Each row names its split, headline subset, resolution,
threshold and TTA; rows that differ in split, subset or resolution are refused (not comparable).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from datasets.splits import split_role
from model import build_model
from model.loading import model_kwargs
from utils.cli import add_debug_flag, positive_int, run_main
from utils.config import load_config
from utils.errors import InputError
from utils.runs import read_history
from utils.flops import cpu_name, latency_summary, model_cost, time_forward
from evaluation.conventions import check_comparable, setting_label, setting_of
from evaluation.subsets import SUBSET_LABELS
from evaluation.summary import HEADLINE_FIGURES, format_value
from utils.tables import markdown_table

START, END = "<!-- results:start -->", "<!-- results:end -->"


def measure_model(cfg, threads: int, repeats: int = 30) -> dict:
    """Parameters, thop GMACs and CPU latency (batch 1, median) of the run's architecture at its image size."""
    model = build_model(cfg.model.name, **{**model_kwargs(cfg), "pretrained": None}).eval()
    size = cfg.data.preprocess.image_size
    x = torch.randn(1, cfg.data.preprocess.in_channels, size, size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        latency = latency_summary(time_forward(model, x, warmup=5, repeats=repeats), 1)["latency_ms"]
    finally:
        torch.set_num_threads(previous)
    return {**model_cost(model, cfg.data.preprocess.in_channels, size), "latency_ms": latency}


def run_row(run_dir: Path, folder: str) -> dict:
    """A run's test.py figures, config and training history (the model is measured later, once rows agree)."""
    metrics_path = run_dir / folder / "metrics.json"
    if not metrics_path.is_file():
        raise InputError(f"{metrics_path} is missing: run python test.py --checkpoint {run_dir}/best.pth "
                         f"with the settings that write '{folder}' (e.g. --split {folder.split('_')[1]})")
    metrics = json.loads(metrics_path.read_text())
    cfg = load_config(run_dir / "config.yaml", saved_by_a_run=True)
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
    command = (run_dir / "command.txt").read_text().splitlines()[0] if (run_dir / "command.txt").is_file() else ""
    row = {"run": str(run_dir), "name": cfg.model.name, "metrics": metrics, "cfg": cfg, "command": command,
           "setting": setting_of(metrics),
           "epochs": len(history), "minutes": sum(r.get("time_s", 0.0) for r in history) / 60.0,
           "train_img_s": (sum(r.get("train_img_s", 0.0) for r in history) / len(history)) if history else 0.0}
    return row


def subset_of(metrics: dict, name: str) -> dict:
    """The figures of one subset; files written before the leak check scored every image (`all` only)."""
    if "subsets" in metrics:
        return metrics["subsets"].get(name) or {}
    return metrics if name == "all" else {}


def cell(figures: dict, key: str) -> str:
    """A percentage with its 95 % interval when there is one, e.g. `99.30 [98.80, 99.70]`; `[degenerate]` when
    every resample gave the same value (no interval, never a zero-width one)."""
    ci = figures.get("ci95") or {}
    return format_value(key, figures, ci.get(key)) + (" [degenerate]" if key in ci.get("degenerate", ()) else "")


def test_command(run: str, setting: dict) -> str:
    """The test.py command that reproduces a row's setting."""
    flags = [f"--split {setting['split']}"]
    if setting["subset"] == "all":
        flags.append("--subset all")
    if setting["tta"]:
        flags.append("--tta")
    if setting["threshold_tuned"]:
        flags.append("--tune-threshold")
    elif setting["threshold"] is not None and abs(setting["threshold"] - 0.5) > 1e-9:
        flags.append(f"--threshold {setting['threshold']:.2f}")
    if setting["calibrated"]:
        flags.append("--calibrate")
    return f"python test.py --checkpoint {run}/best.pth " + " ".join(flags)


GROUP_KEYS = HEADLINE_FIGURES


def render(rows: list[dict], split: str, threads: int) -> str:
    headline = rows[0]["setting"]["subset"]
    resolution = rows[0]["setting"]["resolution"]
    hl = SUBSET_LABELS.get(headline, headline)
    groups = ["leak_free", "all"]
    header = ["model", "params (M)", "GMACs", "CPU latency (ms)", "setting"]
    header += [f"{label} ({SUBSET_LABELS[g]})" for g in groups for _, label in GROUP_KEYS]
    header += [f"Dice global ({hl})", f"Dice 2-class ({hl})", f"mIoU 2-class ({hl})", f"Dice train-res. ({hl})",
               "epochs", "train wall-clock (min)", "train img/s"]
    cells_of = []
    for r in rows:
        m = r["metrics"]
        cells = [r["name"], f"{r['params'] / 1e6:.3f}", f"{r['gmacs']:.3f}", f"{r['latency_ms']:.1f}",
                 setting_label(r["setting"])]
        cells += [cell(subset_of(m, g), key) for g in groups for key, _ in GROUP_KEYS]
        cells += [cell(m, "dice_global"), cell(m, "dice_2class"), cell(m, "miou_2class"), cell(m, "dice_train_res"),
                  str(r["epochs"]), f"{r['minutes']:.1f}", f"{r['train_img_s']:.0f}"]
        cells_of.append(cells)
    lines = [markdown_table(header, cells_of)]
    classes = ["glioma", "meningioma", "no_tumor", "pituitary"]
    per_class = ["", f"Per class ({split} split, {hl}): recall / F1, %", "", markdown_table(
        ["model", *classes], [[r["name"], *(f"{cell(r['metrics'], f'recall_{c}')} / {cell(r['metrics'], f'f1_{c}')}"
                                            for c in classes)] for r in rows])]
    first = rows[0]
    counts = ", ".join(f"{SUBSET_LABELS[g]} {subset_of(first['metrics'], g).get('num_images', '–')}"
                       for g in ("all", "leak_free", "leaked"))
    notes = [
        "",
        f"Data: `{first['metrics'].get('data_root')}`, the `{split}` split, role: {split_role(split)} (images: "
        f"{counts}; `val` selects checkpoints and recipes, so its figures are optimistic; `dev_test` and `test` are "
        "held out), at "
        f"{first['cfg'].data.preprocess.image_size}x{first['cfg'].data.preprocess.image_size}. Leak-free: without the images whose "
        "pixels are identical or near-identical to a training image; all: every image. Headline subset (the "
        f"columns without a group and the per-class table): {hl}. Segmentation scored at "
        + ("each image's own size (logits upsampled bilinearly, masks binarised at 128); `train-res.`: at the "
           "training resolution." if resolution == "native" else "the training resolution.")
        + " Dice/IoU tumour: per image, mean over images with a tumour; global and 2-class: from summed pixel "
        "counts (see [docs/metrics.md](docs/metrics.md)). `[a, b]`: 95 % interval, Clopper-Pearson for "
        "proportions and BCa bootstrap for the rest, resampling scan groups (docs/statistics.md).",
        f"Hardware: {cpu_name()}, {torch.get_num_threads()} cores visible; latency: batch 1, fp32, eval mode, "
        f"{threads} threads, median of 30 after warm-up, measured when this table was generated. GMACs: thop "
        "multiply-accumulates at the training resolution (FLOPs = 2 x MACs).",
        "Commands:",
    ]
    for r in rows:
        notes.append(f"- {r['name']}: `{r['command'] or 'python train.py --config ...'}` then "
                     f"`{test_command(r['run'], r['setting'])}`")
    return "\n".join(lines + per_class + notes)


def class_shape_accuracy(folder: Path, class_name: str) -> dict[str, tuple[int, int]]:
    """{"square": (correct, images), "non_square": ...} of one class's leak-free images, from per_image.csv."""
    from evaluation.per_image import read_per_image_csv

    out = {"square": [0, 0], "non_square": [0, 0]}
    for row in read_per_image_csv(folder / "per_image.csv"):
        if row.get("true_class") != class_name or row.get("subset") == "leaked" or row.get("width") is None:
            continue
        cell = out["square" if row["width"] == row["height"] else "non_square"]
        cell[0] += int(row["correct"])
        cell[1] += 1
    return {key: (value[0], value[1]) for key, value in out.items()}


def transfer_row(run_dir: Path, external: str) -> list[str]:
    """One row of the transfer table: selection split, held-out test, shift suite, external set, shape gap."""
    def read(folder: str) -> dict:
        path = run_dir / folder / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    val, test, ext = read("test_val"), read("test_test"), read(external)
    shift_path = run_dir / "shift_val" / "shift.json"
    shift = json.loads(shift_path.read_text()) if shift_path.is_file() else {}
    cfg = load_config(run_dir / "config.yaml", saved_by_a_run=True)
    name = f"{cfg.experiment.name} seed {cfg.experiment.seed} ({cfg.data.preprocess.resize})"
    held = shift.get("held_out_mean") or {}
    shapes = class_shape_accuracy(run_dir / "test_val", "meningioma") if val else {}
    shape_cell = " / ".join(f"{100 * c / n:.1f} ({c}/{n})" if n else "–"
                            for c, n in (shapes.get("square", (0, 0)), shapes.get("non_square", (0, 0))))
    ext_lf = subset_of(ext, "leak_free") if ext else {}
    cells = [name, str(len(read_history(run_dir))),
             cell(val, "accuracy") if val else "–", cell(val, "dice") if val else "–", shape_cell or "–",
             cell(test, "accuracy") if test else "–", cell(test, "dice") if test else "–",
             f"{100 * held['accuracy']:.2f} / {100 * held['dice']:.2f}" if held.get("accuracy") is not None
             and held.get("dice") is not None else "–"]
    cells += [cell(ext_lf, "accuracy"), cell(ext_lf, "balanced_accuracy"),
              " / ".join(cell(ext_lf, f"recall_{c}").split(" [")[0] for c in ("glioma", "meningioma", "no_tumor")),
              f"{100 * ext['calibration']['ece']:.1f}" if ext.get("calibration") else "–"] if ext else ["–"] * 4
    return cells


def render_transfer(runs: list[Path], external: str) -> str:
    """Does the model read the tumour or the source? One row per run, from test.py's and the shift benchmark's
    outputs in the run directory: `test_val` (selection), `test_test` (held out), `shift_val`, `<external>`."""
    header = ["run (geometry)", "epochs", "val acc % (selection)", "val Dice %", "val meningioma acc % square / "
              "non-square", "test acc % (held out, leak-free)", "test Dice %", "held-out shifts acc / Dice %",
              "external acc % (leak-free)", "external balanced acc %", "external recall glioma / meningioma / "
              "no_tumor %", "external ECE %"]
    return markdown_table(header, [transfer_row(run, external) for run in runs])


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
    parser.add_argument("--folder", default=None,
                        help="read <run>/<folder>/metrics.json instead (another test.py setting, e.g. test_test_tta)")
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads for the latency measurement")
    parser.add_argument("--readme", type=Path, default=None, help="replace the README's results block")
    parser.add_argument("--transfer", default=None, metavar="EXTERNAL_FOLDER",
                        help="print the transfer table instead: per run the selection split, the held-out test "
                             "split, the held-out shifts and the external set scored into <run>/EXTERNAL_FOLDER "
                             "(e.g. test_ext_pmram_test)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.transfer:
        print(render_transfer(args.runs, args.transfer))
        return 0
    folder = args.folder or f"test_{args.split}"
    rows = [run_row(run, folder) for run in args.runs]
    try:
        check_comparable([r["setting"] for r in rows], [r["run"] for r in rows])
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    for row in rows:
        row.update(measure_model(row["cfg"], args.threads))
    split = rows[0]["setting"]["split"]
    table = render(rows, split, args.threads)
    regenerate = ("Regenerate: `python -m evaluation.readme_table " + " ".join(r["run"] for r in rows)
                  + f" --split {split}" + (f" --folder {folder}" if args.folder else "") + " --readme README.md`")
    table += "\n\n" + regenerate
    print(table)
    if args.readme:
        update_readme(args.readme, table)
        print(f"\nupdated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
