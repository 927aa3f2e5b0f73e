"""What `test.py` does: evaluate a checkpoint on a split and write what a researcher can publish.

Figures for the `all`, `leak_free` and `leaked` subsets (images sharing content with the training data are
leaked), segmentation at each image's own size (and at the training resolution, `*_train_res`), 95 % bootstrap
intervals, breakdowns per plane / class / tumour size, calibration; the threshold may be tuned and the
classifier temperature-scaled on the validation split only, never on the split being scored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from datasets import CLASS_NAMES
from datasets.factory import build_eval_dataset, sample_index
from datasets.naming import NO_TUMOR
from datasets.naming import PLANES
from losses import MultiTaskLoss
from model import model_tasks
from model.loading import load_model_from_checkpoint
from utils.config import Config, ConfigError
from evaluation.agreement import gate_masks, gating_figures
from evaluation.bootstrap import bootstrap_intervals
from evaluation.breakdowns import breakdowns
from evaluation.calibration import calibration_summary, fit_temperature
from evaluation.conventions import CONVENTIONS_MD, output_folder_name
from evaluation.inference import collect_outputs, eval_loader, evaluate, predict
from evaluation.leaks import leak_check
from evaluation.metrics import METRIC_DEFINITIONS_MD, MultiTaskMetrics
from evaluation.native import NativeCounts
from evaluation.per_image import per_image_rows, write_per_image_csv
from evaluation.subsets import (HEADLINE_SUBSETS, SUBSET_LABELS, PerImage, excluded_list, per_image_overlap,
                                subset_figures, subset_indices)
from evaluation.summary import summary_table
from utils.runs import write_json_atomic
from utils.runtime import eval_dtype, select_device

THRESHOLD_CANDIDATES = [round(t, 2) for t in np.arange(0.2, 0.81, 0.05)]


@dataclass
class TestOptions:
    checkpoint: Path
    split: str = "test"
    data_root: Optional[str] = None
    tta: bool = False
    threshold: Optional[float] = None
    tune_threshold: bool = False
    out_dir: Optional[Path] = None
    device: str = "auto"
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    use_ema: bool = True
    gradcam: int = 0
    gradcam_layer: Optional[str] = None
    show_progress: bool = True
    subset: str = "leak_free"  # what the headline figures (top level of metrics.json) describe
    calibrate: bool = False
    bootstrap: int = 1000  # resamples for the 95 % intervals; 0: none
    seed: int = 0
    gate_masks: Optional[bool] = None  # empty the mask when the classifier says no_tumor; None: eval.gate_masks
    spacing: Optional[list] = None  # [row, col] mm per pixel for HD95 / ASSD; None: data.spacing of the run
    # Another dataset's layout (brisc | imagefolder | pairs) at data_root: scored by evaluation/external.py
    data_format: Optional[str] = None
    class_map: Optional[dict] = None  # name -> label for the other dataset; None: data.class_map of the run
    data_opts: Optional[list] = None  # `data.<layout key>=value` overrides for the other dataset


def check_options(opts: TestOptions) -> None:
    """Refuse settings that would score a split with something fitted on that same split."""
    if opts.subset not in HEADLINE_SUBSETS:
        raise ConfigError(f"--subset must be one of {', '.join(HEADLINE_SUBSETS)}, got '{opts.subset}'")
    for flag, used in (("--tune-threshold", opts.tune_threshold), ("--calibrate", opts.calibrate)):
        if used and opts.split == "val":
            raise ConfigError(f"{flag} fits on the validation split, so it cannot also score --split val (the "
                              "figures would be optimistic); score another split, e.g. --split test")
    if opts.tune_threshold and opts.threshold is not None:
        raise ConfigError("--threshold and --tune-threshold exclude each other: give a threshold or tune one")
    if opts.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0 (0: no intervals), got {opts.bootstrap}")


def tune_threshold(counts: np.ndarray, annotated: np.ndarray, candidates: list[float]
                   ) -> tuple[float, dict[float, float]]:
    """The candidate with the best per-image tumour Dice (native size); `counts` is (N, candidates, 4).

    Ties go to the candidate nearest 0.5."""
    scores = {}
    for j, t in enumerate(candidates):
        rows = counts[annotated, j]
        tumour = (rows[:, 0] + rows[:, 2]) > 0
        dice, _ = per_image_overlap(rows[tumour])
        scores[t] = float(dice.mean()) if len(dice) else 0.0
    best = max(scores, key=lambda t: (scores[t], -abs(t - 0.5)))
    return best, scores


@torch.no_grad()
def validation_pass(model: nn.Module, cfg: Config, split_path: Path, device: torch.device, opts: TestOptions,
                    thresholds: list[float]) -> dict:
    """Native counts for every candidate threshold, class logits and labels of the run's validation split."""
    dataset = build_eval_dataset(cfg.data, "val", split_path)
    native = NativeCounts(dataset.samples, thresholds, cfg.data.resize)
    logits, labels, ids = collect_outputs(model, eval_loader(cfg, dataset, opts.batch_size, opts.num_workers), device,
                                          opts.tta, show_progress=opts.show_progress, desc="validation split",
                                          on_seg=lambda seg, batch: native.update(seg, batch["id"]))
    counts, annotated = native.counts(ids)
    return {"counts": counts, "annotated": annotated, "logits": None if logits is None else logits.numpy(),
            "labels": labels.numpy()}


def per_image_table(records: list[dict], logits: Optional[np.ndarray], native: Optional[NativeCounts],
                    planes: dict[str, str]) -> PerImage:
    """Align MultiTaskMetrics' per-image records (training resolution) with the native counts and logits;
    `native` is None for a classification-only model (no segmentation figures at all)."""
    stems = [r["id"] for r in records]
    if native is None:
        none = np.zeros((len(stems), 4), dtype=np.int64)
        return PerImage(stems=stems, labels=np.array([r["label"] for r in records], dtype=np.int64), logits=logits,
                        planes=[planes[s] for s in stems], annotated=np.zeros(len(stems), dtype=bool), native=none,
                        train_res=none, has_seg=False)
    native_counts, annotated = native.counts(stems)
    extra = native.boundary_rows(stems) if native.boundary else None
    return PerImage(stems=stems, labels=np.array([r["label"] for r in records], dtype=np.int64), logits=logits,
                    planes=[planes[s] for s in stems], annotated=annotated, native=native_counts[:, 0],
                    train_res=np.array([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in records], dtype=np.int64
                                       ).reshape(-1, 4), distances=None if extra is None else extra[:, :2],
                    sizes=None if extra is None else extra[:, 2:])


def fit_on_validation(model: nn.Module, cfg: Config, split_path: Path, device: torch.device, opts: TestOptions
                      ) -> tuple[float, Optional[dict], Optional[float]]:
    """(threshold, how it was tuned or None, temperature or None): fitted on the validation split when asked."""
    threshold = cfg.eval.threshold if opts.threshold is None else opts.threshold
    tuning, temperature = None, None
    if opts.tune_threshold or opts.calibrate:
        val = validation_pass(model, cfg, split_path, device, opts, THRESHOLD_CANDIDATES)
        if opts.tune_threshold:
            threshold, scores = tune_threshold(val["counts"], val["annotated"], THRESHOLD_CANDIDATES)
            tuning = {"tuned_on": "val", "val_dice_by_threshold": {f"{k:.2f}": v for k, v in scores.items()}}
            print(f"threshold tuned on the validation split: {threshold:.2f} (val Dice {scores[threshold]:.4f}, "
                  "native size)")
        if opts.calibrate:
            temperature = fit_temperature(val["logits"], val["labels"])
            print(f"temperature fitted on the validation split: {temperature:.3f}")
    return threshold, tuning, temperature


def score_subsets(table: PerImage, leaked: Optional[dict], num_classes: int, resamples: int, seed: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(positions of each subset, every figure of each subset with its bootstrap intervals)."""
    indices = subset_indices(table.stems, leaked)
    subsets = {}
    for name, index in indices.items():
        if not len(index):  # e.g. no leaked image: no figures rather than zeros
            subsets[name] = {"num_images": 0}
            continue
        subsets[name] = subset_figures(table, index, CLASS_NAMES)
        subsets[name]["ci95"] = bootstrap_intervals(table, index, num_classes, resamples, seed,
                                                       class_names=CLASS_NAMES) if resamples else None
    return indices, subsets


def print_summary(results: dict, bootstrap: bool) -> None:
    """The leak check, the side-by-side subset table and the calibration line of a results dict."""
    headline, leak_info = results["headline_subset"], results["leak_check"]
    if leak_info.get("applied"):
        kinds = f"; {leak_info['num_exact']} identical, {leak_info['num_near']} near-identical" \
            if "num_exact" in leak_info else ""
        print(f"leak check against {leak_info['against']}: {leak_info['num_leaked']} of "
              f"{results['subsets']['all']['num_images']} images share content with training images{kinds} "
              "(listed in metrics.json)")
    print(f"headline subset (top level of metrics.json): {SUBSET_LABELS[headline]} (marked *)"
          + ("; [95 % bootstrap interval]" if bootstrap else ""))
    print(summary_table(results["subsets"], headline, results.get("distance_unit", "px")))
    gating = results["subsets"][headline].get("mask_gating")
    if gating:
        ungated, gated = gating["ungated"], gating["gated"]
        print(f"class-mask agreement ({SUBSET_LABELS[headline]}): masks {'gated' if gating['applied'] else 'not gated'}"
              f" (eval.gate_masks / --gate-masks); contradiction rate {_pct(ungated['contradiction_rate'])} without "
              f"gating, {_pct(gated['contradiction_rate'])} with; empty-mask false positives "
              f"{_pct(ungated['empty_fp_rate'])} / {_pct(gated['empty_fp_rate'])}; Dice {_pct(ungated['dice'])} / "
              f"{_pct(gated['dice'])}")
    calibration, temperature = results["calibration"], results["temperature"]
    if calibration is None:  # a segmentation-only run
        return
    print(f"calibration ({SUBSET_LABELS[headline]}): ECE {100 * calibration['ece']:.2f} %, NLL "
          f"{calibration['nll']:.4f}" + (f" at temperature {temperature:.3f} (uncalibrated ECE "
                                         f"{100 * calibration['ece_uncalibrated']:.2f} %)" if temperature else ""))


def distance_unit(spacing: Optional[list]) -> str:
    """The unit of HD95 / ASSD: millimetres with a pixel spacing (data.spacing / --spacing), else pixels."""
    return "mm" if spacing else "px"


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def run_test(opts: TestOptions) -> dict:
    """Evaluate `opts.checkpoint` on a split; write metrics.json, reports and figures; return the metrics."""
    if opts.data_format is not None:  # another dataset: evaluation/external.py
        from evaluation.external import run_external_test

        return run_external_test(opts)
    from visualization.breakdowns import save_breakdown_figures
    from visualization.cases import save_case_grid
    from visualization.confusion import save_confusion_matrix
    from visualization.gradcam import write_gradcam_figures

    check_options(opts)
    device = select_device(opts.device, key="--device")
    model, cfg, ckpt = load_model_from_checkpoint(opts.checkpoint, device, use_ema=opts.use_ema)
    if opts.data_root:
        cfg.data.root = opts.data_root
        cfg.data.synthetic = False
    run_dir = Path(opts.checkpoint).resolve().parent
    split_path = run_dir / "split.json"
    num_classes = cfg.model.num_classes
    has_seg = "seg" in model_tasks(model)
    has_cls = "cls" in model_tasks(model)  # False: a segmentation-only run
    for flag, used in (("--calibrate", opts.calibrate), ("--gradcam", opts.gradcam > 0)):
        if used and not has_cls:
            raise ConfigError(f"{flag}: the run of '{cfg.model.name}' trains no classifier (loss.cls_weight=0), so "
                              "there are no class scores to use; drop the option")

    if opts.tune_threshold and not has_seg:
        raise ConfigError(f"--tune-threshold: model '{cfg.model.name}' has no segmentation output, so there is no "
                          "mask threshold to tune; drop the option")
    threshold, tuning, temperature = fit_on_validation(model, cfg, split_path, device, opts)
    gated = bool(cfg.eval.gate_masks if opts.gate_masks is None else opts.gate_masks) and has_seg and has_cls
    out_dir = Path(opts.out_dir) if opts.out_dir else run_dir / output_folder_name(
        opts.split, opts.subset, opts.tta, threshold, cfg.eval.threshold, opts.tune_threshold, opts.calibrate,
        checkpoint=Path(opts.checkpoint).stem, raw_weights=bool(not opts.use_ema and ckpt.get("ema")), gated=gated)
    out_dir.mkdir(parents=True, exist_ok=True)

    dataset = build_eval_dataset(cfg.data, opts.split, split_path)
    metrics = MultiTaskMetrics(num_classes, CLASS_NAMES, threshold=threshold, keep_per_image=True)
    spacing = opts.spacing or cfg.data.spacing
    native = NativeCounts(dataset.samples, [threshold], cfg.data.resize, boundary=True, spacing=spacing or (1.0, 1.0))
    logit_parts: list[torch.Tensor] = []

    def keep(outputs: dict, batch: dict) -> None:
        if has_seg:
            native.update(outputs["seg"], batch["id"])
        if has_cls:
            logit_parts.append(outputs["cls"].cpu())

    loss_fn = MultiTaskLoss(cfg.loss, class_counts=ckpt.get("class_counts")).to(device)
    counted = evaluate(model, eval_loader(cfg, dataset, opts.batch_size, opts.num_workers), metrics, device, loss_fn,
                       eval_dtype(cfg.eval, device), tta=opts.tta, show_progress=opts.show_progress,
                       desc=f"test {opts.split}", on_batch=keep)
    records = metrics.per_image_records()
    table = per_image_table(records, torch.cat(logit_parts).numpy() if has_cls else None,
                            native if has_seg else None, {sample.stem: sample.plane for sample in dataset.samples})
    ungated = table
    if has_seg and has_cls:  # score what the user asked for; keep the other way for `mask_gating`
        table = gate_masks(ungated, NO_TUMOR) if gated else ungated

    leaked, leak_info = leak_check(Path(cfg.data.root), opts.split, split_path, dataset.samples,
                                   cache_dir=run_dir / "leak_check", index=sample_index(cfg.data))
    indices, subsets = score_subsets(table, leaked, num_classes, opts.bootstrap, opts.seed)
    headline = opts.subset if opts.subset in indices else "all"
    if headline != opts.subset:
        print(f"note: no leak check for the {opts.split} split ({leak_info['reason']}); headline subset: all")
    subsets["all"]["loss"] = counted["loss"]
    if has_seg and has_cls:  # gating needs the classifier
        other = gate_masks(ungated, NO_TUMOR)
        for name, index in indices.items():
            if len(index):
                subsets[name]["mask_gating"] = gating_figures(ungated, other, index, CLASS_NAMES, applied=gated)
    if leaked is not None:
        leak_info["num_leaked"] = len(indices["leaked"])
        leak_info["excluded"] = excluded_list(leaked, table.stems, leak_info["against"])
    calibration = calibration_summary(table.logits[indices[headline]], table.labels[indices[headline]],
                                      1.0 if temperature is None else temperature) if has_cls else None
    breakdown = breakdowns(table, indices[headline], CLASS_NAMES, list(PLANES))

    results = scored_results(opts, model, cfg, ckpt, subsets, headline, threshold if has_seg else None, tuning,
                             temperature, gated, counted["loss"], leak_info, breakdown, calibration, spacing)
    num_params = results["params"]
    write_json_atomic(results, out_dir / "metrics.json")

    report = metrics.classification_report(digits=4) if has_cls else ""
    (out_dir / "metric_definitions.md").write_text(METRIC_DEFINITIONS_MD + "\n" + CONVENTIONS_MD, encoding="utf-8")
    if has_cls:  # a segmentation-only run writes no classification report or confusion matrix
        (out_dir / "classification_report.txt").write_text(report + "\n", encoding="utf-8")
        save_confusion_matrix(results["confusion_matrix"], CLASS_NAMES, out_dir / "confusion_matrix.png")
    title = f"{cfg.model.name}, {opts.split} split, {SUBSET_LABELS[headline]}"
    save_breakdown_figures(calibration, breakdown, out_dir, title)
    subset_of = {} if leaked is None else {s: "leaked" if s in leaked else "leak_free" for s in table.stems}
    write_per_image_csv(per_image_rows(table, subset_of, CLASS_NAMES, temperature or 1.0), out_dir / "per_image.csv")
    _write_case_grids(model, dataset, records, cfg, device, threshold, opts.tta, out_dir, save_case_grid)
    if opts.gradcam > 0:
        write_gradcam_figures(model, dataset, out_dir / "gradcam", per_class=opts.gradcam, device=device,
                              class_names=CLASS_NAMES, target_layer=opts.gradcam_layer, mean=cfg.data.mean,
                              std=cfg.data.std)

    shown = f"threshold {threshold:.2f}" if has_seg else "classification only"
    print(f"\n{cfg.model.name} ({num_params:,} parameters), {opts.split} split: {len(dataset)} images, "
          f"{shown}{' (tuned on val)' if opts.tune_threshold else ''}"
          f"{', flip TTA' if opts.tta else ''}{'; segmentation at each image' + chr(39) + 's own size' if has_seg else ''}")
    print_summary(results, bootstrap=opts.bootstrap > 0)
    if has_cls:
        print("\nPer-class report (scikit-learn, all images):\n" + report)
    print(f"results written to {out_dir}")
    return results


def scored_results(opts: TestOptions, model: nn.Module, cfg: Config, ckpt: dict, subsets: dict, headline: str,
                   threshold: Optional[float], tuning: Optional[dict], temperature: Optional[float], gated: bool,
                   loss: Optional[float], leak_info: dict, breakdown: Optional[dict], calibration: Optional[dict],
                   spacing: Optional[list]) -> dict:
    """metrics.json: the headline subset's figures at the top level, then the setting they were scored in
    (split, subsets, resolution, threshold, TTA, weights, ...) and the per-subset figures. The run's own split
    (`run_test`) and another dataset (`evaluation.external`) both write it; the latter adds its own keys."""
    results = dict(subsets[headline])
    results.update({
        "model": cfg.model.name, "params": sum(p.numel() for p in model.parameters()), "split": opts.split,
        "data_root": str(cfg.data.root), "headline_subset": headline, "resolution": "native",
        "threshold": threshold, "threshold_tuned": opts.tune_threshold, "tta": opts.tta, "temperature": temperature,
        "checkpoint": str(opts.checkpoint), "epoch": ckpt.get("epoch"), "image_size": cfg.data.image_size,
        "resize": cfg.data.resize, "gate_masks": gated, "ema_weights": bool(opts.use_ema and ckpt.get("ema")),
        "loss": loss, "subsets": subsets, "leak_check": leak_info, "breakdowns": breakdown,
        "calibration": calibration, "distance_unit": distance_unit(spacing),
    })
    if tuning:
        results["threshold_tuning"] = tuning
    return results


def _write_case_grids(model, dataset, records, cfg, device, threshold, tta, out_dir, save_case_grid,
                      count: int = 6) -> None:
    """Best and worst tumour segmentations (per-image Dice) as image / ground truth / prediction rows."""
    scored = [r for r in records if r.get("dice") is not None and r.get("tumour_pixels", 0) > 0
              and not (isinstance(r["dice"], float) and math.isnan(r["dice"]))]
    if not scored:
        return
    scored.sort(key=lambda r: r["dice"])
    index_of = {stem: i for i, stem in enumerate(dataset.stems)}
    for name, chosen in (("worst_cases.png", scored[:count]), ("best_cases.png", scored[::-1][:count])):
        samples = [dataset[index_of[r["id"]]] for r in chosen]
        images = torch.stack([s["image"] for s in samples])
        with torch.no_grad():
            logits = predict(model, images.to(device), tta=tta)["seg"].float().cpu()
        preds = (torch.sigmoid(logits) >= threshold).float()
        titles = [f"{r['id']}  Dice {r['dice']:.3f}" for r in chosen]
        save_case_grid(images, torch.stack([s["mask"] for s in samples]), preds, titles, out_dir / name,
                       mean=cfg.data.mean, std=cfg.data.std)
