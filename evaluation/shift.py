"""The acquisition-shift benchmark: a checkpoint scored on a split under a fixed, seeded suite of MRI acquisition
shifts (`datasets/mri_shifts.py`), each at several severities, beside the clean figures.

    python -m evaluation.shift --checkpoint runs/demo/latest/best.pth --split val
    python -m evaluation.shift --checkpoint best.pth --split test --shifts gamma noise --severities 1 2 3
    python -m evaluation.shift --checkpoint lever/best.pth --reference baseline/shift_val/shift.json
    python -m evaluation.shift --compare runs/*/latest/shift_val/shift.json      # one row per run

Each shift acts on the decoded uint8 greyscale image at the model's size before normalisation, so the normal
evaluation pipeline (intensity normalisation, `evaluation.inference.evaluate`, `evaluation.metrics`) runs
unchanged: the clean row is exactly `test.py`'s `all` subset at the training resolution (`*_train_res`) on the
same split: shifts act at the model's input size, so every row is scored there, on every image of the split. Per image, the random parts of a shift depend
only on (seed, shift, severity, image id).

Summary, in the manner of ImageNet-C (Hendrycks & Dietterich, 2019), for each headline figure m with error
e = 1 - m: the mean of m over shifts and severities and its drop from clean; the corruption error
CE_shift = mean over severities of e, mCE = mean of CE over shifts, and the relative mCE = mean over shifts and
severities of (e - e_clean). ImageNet-C divides each CE by a reference model's; `--reference` does the same with
another checkpoint's shift.json (`mce_normalised`, 1.0 = as robust as the reference).

A shift that one of the run's training augmentations imitates (`datasets.mri_shifts.imitated_by`, with the
run's `data.augment`) is in distribution for that run: the table names those augmentations beside each shift
("held out" when none does), and `held_out_mean` averages the held-out shifts only. The shifts act on the
image as placed on the model's input (`data.preprocess.resize`; a head run sees its head crop shifted).
Writes `shift.json` and `shift.png` (default folder: `<run>/shift_<split>`, `_<runtime>[-<precision>]` added for
another runtime than eager PyTorch, e.g. `--runtime onnxruntime`) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


from datasets import CLASS_NAMES
from datasets.factory import build_eval_dataset
from datasets.mri_shifts import MAX_SEVERITY, SEVERITIES, SHIFT_NAMES, ShiftHook, imitated_by, severity_params
from datasets.transforms import MRI_AUGMENTS
from evaluation.inference import eval_loader, evaluate
from evaluation.metrics import MultiTaskMetrics
from evaluation.native import fallback_note, geometry_summary
from evaluation.summary import HEADLINE_FIGURES
from utils.tables import markdown_table
from model.loading import load_model_from_checkpoint
from utils.allocator import keep_freed_memory
from utils.cli import add_debug_flag, add_eval_flags, run_main
from utils.errors import InputError
from utils.runs import write_json_atomic
from utils.runtime import select_device

HEADLINE = HEADLINE_FIGURES  # the figures of the benchmark: (key in the metric dict, column label)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def suite_summary(clean: dict, shifted: dict, severities: Sequence[str], reference: Optional[dict] = None) -> dict:
    """Suite means, drops from clean and corruption errors from per-shift, per-severity headline figures.

    `clean`: {metric: value}; `shifted`: {shift: {severity: {metric: value}}}; `reference`: another shift.json.
    """
    metrics = [key for key, _ in HEADLINE]
    names = list(shifted)
    by_sev = {s: {m: _mean([shifted[n][s][m] for n in names]) for m in metrics} for s in severities}
    mean = {m: _mean([shifted[n][s][m] for n in names for s in severities]) for m in metrics}
    ce = {n: {m: _mean([1.0 - shifted[n][s][m] for s in severities]) for m in metrics} for n in names}
    out = {
        "mean_by_severity": by_sev,
        "mean": mean,
        "drop": {m: clean[m] - mean[m] for m in metrics},
        "drop_by_severity": {s: {m: clean[m] - by_sev[s][m] for m in metrics} for s in severities},
        "corruption_error": ce,
        "mce": {m: _mean([ce[n][m] for n in names]) for m in metrics},
        "relative_mce": {m: _mean([ce[n][m] - (1.0 - clean[m]) for n in names]) for m in metrics},
    }
    if reference is not None:
        ref_ce = reference["corruption_error"]
        missing = [n for n in names if n not in ref_ce]
        if missing:
            raise ValueError(f"the reference shift.json has no '{missing[0]}' shift; run it with the same --shifts")
        out["mce_normalised"] = {m: _mean([ce[n][m] / max(ref_ce[n][m], 1e-12) for n in names]) for m in metrics}
    return out


def held_out_mean(shifted: dict, imitated: dict[str, list[str]]) -> Optional[dict]:
    """Mean of each headline figure over the shifts no training augmentation imitates, every severity; None
    when every shift scored is imitated."""
    held = [name for name in shifted if not imitated.get(name)]
    if not held:
        return None
    return {key: _mean([v[key] for name in held for v in shifted[name].values()]) for key, _ in HEADLINE}


def shift_table(result: dict) -> str:
    """Markdown table: clean, every shift and severity with the training augmentations that imitate it ("held
    out": none), the suite means, the held-out mean and the drop from clean (percent)."""
    labels = [label for _, label in HEADLINE]
    keys = [key for key, _ in HEADLINE]
    imitated = result.get("imitated_by")  # absent in a shift.json written before the column existed
    rows = [("clean", "-", "", result["clean"])]
    for name, by_sev in result["shifted"].items():
        by = "" if imitated is None else ", ".join(imitated.get(name, [])) or "held out"
        rows += [(name, s, by, values) for s, values in by_sev.items()]
    rows += [("mean over shifts", s, "", values) for s, values in result["mean_by_severity"].items()]
    rows += [("mean over suite", "all", "", result["mean"])]
    if result.get("held_out_mean"):
        rows += [("mean over held-out shifts", "all", "held out", result["held_out_mean"])]
    rows += [("drop from clean", "all", "", result["drop"])]
    cells = [[name, str(s), by, *(f"{100 * values[k]:.2f}" for k in keys)] for name, s, by, values in rows]
    return markdown_table(["shift", "severity", "imitated by (training augmentation)", *labels], cells, pad=True)


def compare_table(paths: Sequence[Path], severity: str = "2") -> str:
    """Markdown table of several shift.json files (e.g. one per training lever): clean figures, the suite mean at
    `severity` and over all severities, the relative mCE and the mean over the shifts that no training
    augmentation of the run imitates ("-" when none is held out or the file predates it), in percent."""
    header = ["run", "intensity norm", "MRI augmentation", "clean acc", "clean Dice", f"sev {severity} acc",
              f"sev {severity} Dice", "suite acc", "suite Dice", "rel. mCE acc", "rel. mCE Dice", "held-out acc",
              "held-out Dice"]
    lines = []
    for path in paths:
        r = json.loads(Path(path).read_text(encoding="utf-8"))
        if severity not in r["mean_by_severity"]:
            raise InputError(f"'{path}' has no severity {severity} (it has {', '.join(r['severities'])})")
        name = Path(r["checkpoint"]).resolve().parent.parent.name
        sev = r["mean_by_severity"][severity]
        cells = [r["clean"]["accuracy"], r["clean"]["dice"], sev["accuracy"], sev["dice"], r["mean"]["accuracy"],
                 r["mean"]["dice"], r["relative_mce"]["accuracy"], r["relative_mce"]["dice"]]
        by_p: dict[float, list[str]] = {}
        for key, p in r.get("mri_augment", {}).items():
            by_p.setdefault(p, []).append(key.removeprefix("p_").removeprefix("mri_"))
        augment = "; ".join(f"{', '.join(names)} at {p:g}" for p, names in by_p.items())
        held = r.get("held_out_mean")
        held_cells = [f"{100 * held[k]:.2f}" if held else "-" for k in ("accuracy", "dice")]
        lines.append([name, r["intensity_norm"], augment or "none", *(f"{100 * c:.2f}" for c in cells), *held_cells])
    return markdown_table(header, lines)


def severity(text: str) -> float:
    """argparse type: a severity in (0, MAX_SEVERITY]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= MAX_SEVERITY:
        raise argparse.ArgumentTypeError(f"expected a severity in (0, {MAX_SEVERITY:g}], got {text}")
    return value


def run_shift_benchmark(checkpoint: Path, split: str = "val", shifts: Sequence[str] = SHIFT_NAMES,
                        severities: Sequence[float] = SEVERITIES, seed: int = 0, out_dir: Optional[Path] = None,
                        device_name: str = "auto", batch_size: Optional[int] = None,
                        num_workers: Optional[int] = None, use_ema: bool = True, threshold: Optional[float] = None,
                        tta: bool = False, data_root: Optional[str] = None, reference: Optional[Path] = None,
                        show_progress: bool = True, runtime: Optional[str] = None,
                        precision: Optional[str] = None) -> dict:
    """Score `checkpoint` clean and under every shift and severity; write shift.json and shift.png.
    `runtime` / `precision`: the inference runtime (None: eval.runtime / eval.runtime_precision, torch / fp32)."""
    from evaluation.predictor import chosen_runtime, inference_predictor, runtime_label, runtime_record
    from visualization.shift import save_shift_figure

    for s in severities:
        if not 0.0 < float(s) <= MAX_SEVERITY:
            raise InputError(f"severity {s} is outside (0, {MAX_SEVERITY:g}]")
    reference_result = json.loads(Path(reference).read_text(encoding="utf-8")) if reference else None
    device = select_device(device_name)
    model, cfg, ckpt = load_model_from_checkpoint(checkpoint, device, use_ema=use_ema)
    runtime, precision = chosen_runtime(cfg.eval, runtime, precision)
    if runtime != "torch":
        model = inference_predictor(checkpoint, runtime, precision, device, use_ema, data_root, loaded=ckpt)
    if data_root:
        cfg.data.root, cfg.data.generated.enabled = data_root, False
    run_dir = Path(checkpoint).resolve().parent
    dataset = build_eval_dataset(cfg.data, split, run_dir / "split.json", verbose=show_progress)
    threshold = cfg.eval.threshold if threshold is None else threshold
    loader = eval_loader(cfg, dataset, batch_size, num_workers)
    metrics = MultiTaskMetrics(cfg.model.num_classes, CLASS_NAMES, threshold=threshold)

    def score(hook: Optional[ShiftHook], desc: str) -> dict:
        dataset.shift = hook
        results = evaluate(model, loader, metrics, device, tta=tta, show_progress=show_progress, desc=desc)
        return {key: float(results[key]) for key, _ in HEADLINE}

    labels = [f"{float(s):g}" for s in severities]
    clean = score(None, "clean")
    shifted = {name: {label: score(ShiftHook(name, float(s), seed), f"{name} {label}")
                      for s, label in zip(severities, labels)} for name in shifts}
    dataset.shift = None
    imitated = {name: imitated_by(name, cfg.data.augment) for name in shifts}
    geometry = geometry_summary(dataset)
    result = {
        "checkpoint": str(checkpoint), "model": cfg.model.name, "split": split, "num_images": len(dataset),
        "subset": "all", "resolution": "training",
        "image_size": cfg.data.preprocess.image_size, "intensity_norm": cfg.data.preprocess.intensity_norm,
        "mri_augment": {key: getattr(cfg.data.augment, key) for key, _ in MRI_AUGMENTS
                        if getattr(cfg.data.augment, key) > 0},
        "threshold": threshold,
        "tta": tta, "seed": seed, "shifts": list(shifts), "severities": labels,
        "severity_params": {n: {label: severity_params(n, float(s)) for s, label in zip(severities, labels)}
                            for n in shifts},
        "clean": clean, "shifted": shifted, "geometry": geometry, **runtime_record(model),
        "imitated_by": imitated, "held_out": [name for name in shifts if not imitated[name]],
        "held_out_mean": held_out_mean(shifted, imitated),
    }
    result.update(suite_summary(clean, shifted, labels, reference_result))
    if reference:
        result["reference"] = str(reference)
    suffix = "" if (runtime, precision) == ("torch", "fp32") else f"_{runtime}" + (
        "" if precision == "fp32" else f"-{precision}")  # as test.py's folders: another runtime keeps its own
    out_dir = Path(out_dir) if out_dir else run_dir / f"shift_{split}{suffix}"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result, out_dir / "shift.json")
    save_shift_figure(result, out_dir / "shift.png")
    print(f"\n{cfg.model.name}, {split} split ({len(dataset)} images, {cfg.data.preprocess.image_size}px, threshold "
          f"{threshold:.2f}, {runtime_label(model)}), acquisition shifts at severities {', '.join(labels)}; "
          "figures in %:")
    print(shift_table(result))
    note = fallback_note(geometry, len(dataset), f"the {split} split")
    if note:
        print(note)
    mce = ", ".join(f"{label} {100 * result['relative_mce'][key]:.2f}" for key, label in HEADLINE)
    print(f"relative mCE (mean error increase over clean, points): {mce}")
    print(f"results written to {out_dir}")
    return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_flags(parser, split_default="val", checkpoint_required=False)
    parser.add_argument("--compare", nargs="+", type=Path, metavar="SHIFT_JSON",
                        help="instead of scoring: one table row per shift.json (run name = its run folder)")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFT_NAMES), choices=SHIFT_NAMES, metavar="SHIFT",
                        help=f"shifts to apply (default: all of {', '.join(SHIFT_NAMES)})")
    parser.add_argument("--severities", nargs="+", type=severity, default=list(SEVERITIES),
                        help="severities in (0, 3]; 1-3 are the suite's levels, others interpolate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shifts' random parts")
    parser.add_argument("--reference", type=Path, default=None,
                        help="another checkpoint's shift.json: normalise the corruption errors by its own")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/shift_<split>)")
    parser.add_argument("--no-progress", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.compare is None):
        parser.error("give --checkpoint (score a run) or --compare (tabulate shift.json files)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Score a run under the shifts, or tabulate shift.json files; a mistake raises a `UserError` (run_main)."""
    args = parse_args(argv)
    if args.compare:
        print(compare_table(args.compare))
        return 0
    run_shift_benchmark(args.checkpoint, args.split, args.shifts, args.severities, args.seed, args.out,
                        args.device, args.batch_size, args.num_workers, not args.no_ema, args.threshold,
                        args.tta, args.data_root, args.reference, show_progress=not args.no_progress,
                        runtime=args.runtime, precision=args.precision)
    return 0


if __name__ == "__main__":
    # CPU: large activations are reused instead of faulted in afresh at every batch (see utils/allocator.py)
    keep_freed_memory()
    sys.exit(run_main(main))
