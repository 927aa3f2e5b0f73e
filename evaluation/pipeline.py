"""What `test.py` does: score a checkpoint on a source (`evaluation.sources`) and write what a researcher can publish.

The steps, once for every source: load the checkpoint; fit the threshold / temperature on the run's validation
split (never on the split being scored); choose the output folder; build the dataset; run the one inference loop
(`evaluation.inference.inference_batches`) counting pixels at each image's own size; align the per-image table;
check it for copies of training images (leak or overlap check); score the `all`, `leak_free` and `leaked` subsets
with 95 % bootstrap intervals; choose the headline subset; calibration; breakdowns per plane / class / tumour
size; metrics.json; the files (reports, figures, per_image.csv); the console summary.
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
from datasets.factory import build_eval_dataset
from datasets.duplicates import scan_group_ids
from datasets.naming import NO_TUMOR, PLANES
from datasets.splits import split_role
from losses import MultiTaskLoss
from model import model_tasks
from model.loading import load_model_from_checkpoint
from evaluation.agreement import gate_masks, gating_figures
from evaluation.bootstrap import bootstrap_intervals
from evaluation.breakdowns import breakdowns
from evaluation.calibration import calibration_summary, fit_temperature, softmax
from evaluation.conventions import CONVENTIONS_MD, output_folder_name
from evaluation.inference import eval_loader, inference_batches, predict
from evaluation.labels import label_probabilities
from evaluation.metrics import METRIC_DEFINITIONS_MD, MultiTaskMetrics
from evaluation.native import NativeCounts, fallback_note, geometry_summary
from evaluation.options import THRESHOLD_CANDIDATES, TestOptions, check_options, check_tasks
from evaluation.per_image import per_image_rows, write_per_image_csv
from evaluation.predictor import chosen_runtime, inference_predictor, runtime_label, runtime_record
from evaluation.sources import Source, add_label_figures, other_dataset, own_split, with_labels
from evaluation.subsets import PerImage, per_image_overlap, subset_figures, subset_indices
from evaluation.subgroups import annotate_table, subgroup_breakdown
from evaluation.summary import print_summary
from utils.config import Config
from utils.flops import count_parameters
from utils.runs import write_json_atomic
from utils.runtime import eval_dtype, select_device

__all__ = ["TestOptions", "run_test", "score_source", "Scored"]


@dataclass
class Scored:
    """One pass of the model over a dataset: the per-image table and what the metrics counted."""

    table: PerImage
    labels: np.ndarray  # (N,) the dataset's labels (model classes, or another dataset's label indices)
    logits: Optional[np.ndarray]  # (N, K) model-class logits when the source scores classes
    records: list[dict]  # MultiTaskMetrics' per-image records (training resolution)
    loss: Optional[float]


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


def score_source(model: nn.Module, cfg: Config, dataset, source: Source, device: torch.device,
                 thresholds: list[float], tta: bool = False, batch_size: Optional[int] = None,
                 num_workers: Optional[int] = None, loss_fn: Optional[nn.Module] = None, show_progress: bool = True,
                 desc: str = "eval", boundary: bool = True) -> tuple[Scored, NativeCounts]:
    """Run the model over `dataset` once: native-size pixel counts at each of `thresholds` (the first one scores),
    class logits, labels, MultiTaskMetrics' records of `source.metric_tasks`, the loss when `loss_fn` is given;
    `boundary`: HD95 / ASSD and tumour sizes too (one threshold only). In head mode each image's logits go
    back through its own placement (`dataset.placement`)."""
    metrics = MultiTaskMetrics(cfg.model.num_classes, CLASS_NAMES, threshold=thresholds[0], keep_per_image=True)
    spacing = source.spacing or (1.0, 1.0)
    placement = dataset.placement if source.data.preprocess.resize == "head" else None
    native = NativeCounts(dataset.samples, thresholds, source.data.preprocess.resize, boundary=boundary,
                          spacing=spacing, placement=placement)
    logits, labels, ids = [], [], []
    loss_sum, count = 0.0, 0
    for outputs, batch in inference_batches(model, eval_loader(cfg, dataset, batch_size, num_workers), device, tta,
                                            eval_dtype(cfg.eval, device), show_progress=show_progress, desc=desc):
        if source.metric_tasks:
            metrics.update({k: v for k, v in outputs.items() if k in source.metric_tasks}, batch)
        if loss_fn is not None:
            loss_sum += float(loss_fn(outputs, batch)[0]) * len(batch["id"])
        if source.score_seg:
            native.update(outputs["seg"], batch["id"])
        if source.score_cls:
            logits.append(outputs["cls"].cpu())
        labels.append(batch["label"].cpu())
        ids += list(batch["id"])
        count += len(batch["id"])
    labels_np = torch.cat(labels).numpy()
    logits_np = torch.cat(logits).numpy() if logits else None
    records = metrics.per_image_records() if source.metric_tasks else [
        {"id": stem, "label": int(label)} for stem, label in zip(ids, labels_np)]
    table = per_image_table(records, logits_np if source.model_space else None, native if source.score_seg else None,
                            {s.stem: s.plane for s in dataset.samples})
    loss = loss_sum / max(count, 1) if loss_fn is not None else None
    return Scored(table, labels_np, logits_np, records, loss), native


def per_image_table(records: list[dict], logits: Optional[np.ndarray], native: Optional[NativeCounts],
                    planes: dict[str, str]) -> PerImage:
    """Align MultiTaskMetrics' per-image records (training resolution) with the native counts and logits;
    `native` is None without segmentation figures."""
    stems = [r["id"] for r in records]
    labels = np.array([r["label"] for r in records], dtype=np.int64)
    if native is None:
        none = np.zeros((len(stems), 4), dtype=np.int64)
        return PerImage(stems=stems, labels=labels, logits=logits, planes=[planes[s] for s in stems],
                        annotated=np.zeros(len(stems), dtype=bool), native=none, train_res=none, has_seg=False)
    native_counts, annotated = native.counts(stems)
    extra = native.boundary_rows(stems) if native.boundary else None
    return PerImage(stems=stems, labels=labels, logits=logits, planes=[planes[s] for s in stems], annotated=annotated,
                    native=native_counts[:, 0],
                    train_res=np.array([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in records], dtype=np.int64
                                       ).reshape(-1, 4), distances=None if extra is None else extra[:, :2],
                    sizes=None if extra is None else extra[:, 2:])


def fit_on_validation(model: nn.Module, cfg: Config, split_path: Path, device: torch.device, opts: TestOptions,
                      has_cls: bool, has_seg: bool) -> tuple[float, Optional[dict], Optional[float]]:
    """(threshold, how it was tuned or None, temperature or None): fitted on the run's validation split when asked."""
    threshold = cfg.eval.threshold if opts.threshold is None else opts.threshold
    tuning, temperature = None, None
    if not (opts.tune_threshold or opts.calibrate):
        return threshold, tuning, temperature
    val = Source(data=cfg.data, split="val", split_path=split_path, index=None, score_cls=has_cls, score_seg=has_seg,
                 check_overlap=lambda samples: (None, {}), overlap_name="", title="", progress="validation split")
    dataset = build_eval_dataset(cfg.data, "val", split_path)
    scored, native = score_source(model, cfg, dataset, val, device, THRESHOLD_CANDIDATES, opts.tta, opts.batch_size,
                                  opts.num_workers, show_progress=opts.show_progress, desc="validation split",
                                  boundary=False)
    geometry = geometry_summary(dataset)
    note = fallback_note(geometry, len(dataset), "the validation split")
    if note:
        print(note)
    if opts.tune_threshold:
        counts, annotated = native.counts(scored.table.stems)
        threshold, scores = tune_threshold(counts, annotated, THRESHOLD_CANDIDATES)
        tuning = {"tuned_on": "val", "val_dice_by_threshold": {f"{k:.2f}": v for k, v in scores.items()}}
        if "head_fallbacks" in geometry:
            tuning["val_head_fallbacks"] = geometry["head_fallbacks"]
        print(f"threshold tuned on the validation split: {threshold:.2f} (val Dice {scores[threshold]:.4f}, "
              "native size)")
    if opts.calibrate:
        temperature = fit_temperature(scored.logits, scored.labels)
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
                                                    class_names=CLASS_NAMES, groups=table.groups) if resamples else None
    return indices, subsets


def headline_subset(wanted: str, indices: dict[str, np.ndarray], leak_info: dict, source: Source) -> str:
    """`wanted` (leak_free or all), or `all` when there is no leak check or no leak-free image (said on the console)."""
    if wanted not in indices:
        print(f"note: no {source.overlap_name} ({leak_info['reason']}); headline subset: all")
        return "all"
    if not len(indices[wanted]):  # every image has a copy in the training data
        leak_info["note"] = "every image has a copy in the training data: no leak-free figures; headline subset: all"
        print(f"note: {leak_info['note']}")
        return "all"
    return wanted


def run_test(opts: TestOptions) -> dict:
    """Evaluate `opts.checkpoint` on its own split, or on another dataset with `opts.data_format`; write
    metrics.json, reports and figures; return the metrics."""
    check_options(opts)
    device = select_device(opts.device, key="--device")
    model, cfg, ckpt = load_model_from_checkpoint(opts.checkpoint, device, use_ema=opts.use_ema)
    runtime, precision = chosen_runtime(cfg.eval, opts.runtime, opts.precision)
    tasks = model_tasks(model)
    has_cls, has_seg = "cls" in tasks, "seg" in tasks
    check_tasks(opts, cfg.model.name, has_cls, has_seg)
    run_dir = Path(opts.checkpoint).resolve().parent
    build = own_split if opts.data_format is None else other_dataset
    source = build(cfg, opts, run_dir, has_cls, has_seg)
    # every prediction below comes from the chosen runtime; the eager model stays for Grad-CAM and the parameter count
    predictor = model if runtime == "torch" else inference_predictor(
        opts.checkpoint, runtime, precision, device, opts.use_ema,
        data_root=opts.data_root if opts.data_format is None else None, loaded=ckpt)
    threshold, tuning, temperature = fit_on_validation(predictor, cfg, run_dir / "split.json", device, opts, has_cls,
                                                       has_seg)
    out_dir = Path(opts.out_dir) if opts.out_dir else run_dir / source.folder(output_folder_name(
        opts.split, opts.subset, opts.tta, threshold, cfg.eval.threshold, opts.tune_threshold, opts.calibrate,
        checkpoint=Path(opts.checkpoint).stem, raw_weights=bool(not opts.use_ema and ckpt.get("ema")),
        gated=source.gated, runtime=runtime, precision=precision))

    dataset = build_eval_dataset(source.data, opts.split, source.split_path, verbose=source.index is None,
                                 index=source.index)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_fn = MultiTaskLoss(cfg.loss, class_counts=ckpt.get("class_counts")).to(device) if source.has_loss else None
    scored, _ = score_source(predictor, cfg, dataset, source, device, [threshold], opts.tta, opts.batch_size,
                             opts.num_workers, loss_fn, opts.show_progress, source.progress)
    ungated = scored.table
    geometry = geometry_summary(dataset)
    table = gate_masks(ungated, NO_TUMOR) if source.gated else ungated

    leaked, leak_info = source.check_overlap(dataset.samples)
    # storage (1- / 3-channel file) and scan groups: the subgroups and the resampling units of every interval
    sample_of = {s.stem: s for s in dataset.samples}
    scored_samples = [sample_of[stem] for stem in table.stems]
    groups = scan_group_ids(scored_samples, cfg.data.split.group_threshold, cache_dir=run_dir / "leak_check")
    annotate_table(table, [s.image for s in scored_samples], groups)
    indices, subsets = score_subsets(table, leaked, cfg.model.num_classes, opts.bootstrap, opts.seed)
    headline = headline_subset(opts.subset, indices, leak_info, source)
    if leaked is not None:
        leak_info["num_leaked"] = len(indices["leaked"])
    subsets["all"]["loss"] = scored.loss
    if source.score_seg and source.score_cls and source.space is None:  # gating needs the classifier
        other = gate_masks(ungated, NO_TUMOR)
        for name, index in indices.items():
            if len(index):
                subsets[name]["mask_gating"] = gating_figures(ungated, other, index, CLASS_NAMES, applied=source.gated)
    labels = _label_predictions(scored, source, temperature)
    if labels is not None:  # figures in another dataset's label space
        add_label_figures(subsets, indices, *labels, source.space, opts.bootstrap, opts.seed, groups=table.groups)
    calibration = calibration_summary(table.logits[indices[headline]], table.labels[indices[headline]],
                                      temperature or 1.0) if source.score_cls and source.model_space else None
    breakdown = breakdowns(table, indices[headline], CLASS_NAMES, list(PLANES)) \
        if source.model_space or not source.score_cls else None
    # the source proxies of the file (shape, storage, size): a model that reads them scores unevenly across them
    subgroups = subgroup_breakdown(table, indices[headline], CLASS_NAMES, opts.bootstrap, opts.seed) \
        if table.sizes is not None and (source.model_space or not source.score_cls) else None

    results = scored_results(opts, model, cfg, ckpt, subsets, headline, threshold if source.score_seg else None,
                             tuning, temperature, source, scored.loss, leak_info, breakdown, calibration, subgroups)
    results["geometry"] = geometry
    results.update(runtime_record(predictor))
    write_json_atomic(results, out_dir / "metrics.json")
    report = write_files(out_dir, opts, model, cfg, device, dataset, source, scored, table, results, leaked, labels,
                         threshold, temperature, headline, predictor)

    shown = f"threshold {threshold:.2f}" if source.score_seg else "classification only"
    native_note = "; segmentation at each image's own size" if source.score_seg else ""
    print(f"\n{cfg.model.name} ({results['params']:,} parameters){source.title}: {len(dataset)} images, "
          f"{shown}{' (tuned on val)' if opts.tune_threshold else ''}{', flip TTA' if opts.tta else ''}{native_note}")
    print(runtime_label(predictor))
    if labels is not None:
        print(f"labels ({'the model' + chr(39) + 's classes' if source.model_space else 'mapped by the class map'}): "
              + ", ".join(f"{name} {int((labels[0] == k).sum())} images" for k, name in enumerate(source.space.names)))
    for what, why in source.absent.items():
        print(f"no {what} figures: {why}")
    note = fallback_note(geometry, len(dataset), f"the {opts.split} split")
    if note:
        print(note)
    print_summary(results, bootstrap=opts.bootstrap > 0)
    if report:
        kind = "Per-class" if source.space is None else "Per-label"
        print(f"\n{kind} report (scikit-learn, all images):\n{report}")
    print(f"results written to {out_dir}")
    return results


def _label_predictions(scored: Scored, source: Source, temperature: Optional[float]
                       ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(true labels, predicted labels, label probabilities) in another dataset's label space; None otherwise."""
    if source.space is None or not source.score_cls:
        return None
    logits = scored.logits
    pred = np.asarray(source.space.of_model_class)[logits.argmax(1)]
    return (source.truth(scored.labels), pred,
            label_probabilities(softmax(logits, temperature or 1.0), source.space))


def scored_results(opts: TestOptions, model: nn.Module, cfg: Config, ckpt: dict, subsets: dict, headline: str,
                   threshold: Optional[float], tuning: Optional[dict], temperature: Optional[float], source: Source,
                   loss: Optional[float], leak_info: dict, breakdown: Optional[dict], calibration: Optional[dict],
                   subgroups: Optional[dict] = None) -> dict:
    """metrics.json: the headline subset's figures at the top level, then the setting they were scored in
    (split, subsets, resolution, threshold, TTA, weights, ...), the per-subset figures and the source's own keys."""
    results = dict(subsets[headline])
    results.update({
        "model": cfg.model.name, "params": count_parameters(model), "split": opts.split,
        "split_role": split_role(opts.split),
        "data_root": str(source.data.root), "headline_subset": headline, "resolution": "native",
        "threshold": threshold, "threshold_tuned": opts.tune_threshold, "tta": opts.tta, "temperature": temperature,
        "checkpoint": str(opts.checkpoint), "epoch": ckpt.get("epoch"), "image_size": cfg.data.preprocess.image_size,
        "resize": cfg.data.preprocess.resize, "gate_masks": source.gated,
        "ema_weights": bool(opts.use_ema and ckpt.get("ema")),
        "loss": loss, "subsets": subsets, "leak_check": leak_info, "breakdowns": breakdown,
        "calibration": calibration, "distance_unit": "mm" if source.spacing else "px", "subgroups": subgroups,
        "scan_grouping": {"method": "datasets.duplicates.scan_group_ids (chains of 32x32 thumbnail correlation)",
                          "threshold": cfg.data.split.group_threshold,
                          "num_groups": {name: (subsets[name].get("ci95") or {}).get("num_groups")
                                         for name in subsets}},
    })
    if tuning:
        results["threshold_tuning"] = tuning
    results.update(source.extra)
    return results


def write_files(out_dir: Path, opts: TestOptions, model: nn.Module, cfg: Config, device: torch.device, dataset,
                source: Source, scored: Scored, table: PerImage, results: dict, leaked: Optional[dict],
                labels: Optional[tuple], threshold: float, temperature: Optional[float], headline: str,
                predictor: Optional[nn.Module] = None) -> str:
    """metric_definitions.md, classification_report.txt, the figures and per_image.csv; returns the report text.
    The case grids use `predictor` (the runtime that was scored), Grad-CAM the eager `model`."""
    from sklearn.metrics import classification_report

    from evaluation.subsets import SUBSET_LABELS
    from visualization.breakdowns import save_breakdown_figures
    from visualization.confusion import save_confusion_matrix
    from visualization.gradcam import write_gradcam_figures

    (out_dir / "metric_definitions.md").write_text(METRIC_DEFINITIONS_MD + "\n" + CONVENTIONS_MD + source.definitions,
                                                   encoding="utf-8")
    subset_of = {} if leaked is None else {s: "leaked" if s in leaked else "leak_free" for s in table.stems}
    rows = per_image_rows(table, subset_of, CLASS_NAMES, temperature or 1.0)
    report = ""
    if source.score_cls:  # a segmentation-only run writes no classification report or confusion matrix
        names = source.label_names()
        truth, pred = (labels[0], labels[1]) if labels is not None else (table.labels, table.logits.argmax(1))
        save_confusion_matrix(results["confusion_matrix"], names, out_dir / "confusion_matrix.png")
        report = classification_report(truth, pred, labels=list(range(len(names))), target_names=names, digits=4,
                                       zero_division=0)
        (out_dir / "classification_report.txt").write_text(report + "\n", encoding="utf-8")
    if labels is not None:
        rows = [with_labels(row, n, *labels[:2], scored.logits, labels[2], source.space) for n, row in enumerate(rows)]
    write_per_image_csv(rows, out_dir / "per_image.csv")
    if source.space is None:  # the run's own split: figures per plane / class / size, best and worst cases
        title = f"{cfg.model.name}, {opts.split} split, {SUBSET_LABELS[headline]}"
        save_breakdown_figures(results["calibration"], results["breakdowns"], out_dir, title,
                               subgroups=results["subgroups"])
        write_case_grids(predictor or model, dataset, scored.records, cfg, device, threshold, opts.tta, out_dir)
    if opts.gradcam > 0:
        write_gradcam_figures(model, dataset, out_dir / "gradcam", per_class=opts.gradcam, device=device,
                              class_names=CLASS_NAMES, target_layer=opts.gradcam_layer, mean=cfg.data.preprocess.mean,
                              std=cfg.data.preprocess.std)
    return report


def write_case_grids(model: nn.Module, dataset, records: list[dict], cfg: Config, device: torch.device,
                     threshold: float, tta: bool, out_dir: Path, count: int = 6) -> None:
    """Best and worst tumour segmentations (per-image Dice) as image / ground truth / prediction rows."""
    from visualization.cases import save_case_grid

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
                       mean=cfg.data.preprocess.mean, std=cfg.data.preprocess.std)
