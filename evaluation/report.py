"""What `test.py` does: evaluate a checkpoint on a split, tune the threshold, write reports and figures,
or predict on a folder of unlabelled images."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from datasets import CLASS_NAMES
from datasets.factory import build_eval_dataset
from losses import MultiTaskLoss
from model.loading import load_model_from_checkpoint
from utils.config import Config
from evaluation.inference import evaluate, move_batch, predict
from evaluation.metrics import METRIC_DEFINITIONS_MD, MultiTaskMetrics
from utils.runs import write_json_atomic
from utils.runtime import eval_dtype, select_device

# Rows of the printed summary: (key in the metric dict, label, what it averages over).
SUMMARY_ROWS = [
    ("accuracy", "Accuracy", "all images"),
    ("precision_macro", "Precision (macro)", "mean over classes"),
    ("recall_macro", "Recall (macro)", "mean over classes"),
    ("f1_macro", "F1 (macro)", "mean over classes"),
    ("f1_weighted", "F1 (weighted)", "classes weighted by support"),
    ("dice", "Dice (tumour, per image)", "mean over images with tumour"),
    ("iou", "IoU (tumour, per image)", "mean over images with tumour"),
    ("dice_global", "Dice (tumour, global)", "summed TP/FP/FN over the split"),
    ("iou_global", "IoU (tumour, global)", "summed TP/FP/FN over the split"),
    ("dice_2class", "Dice (2-class mean)", "background and tumour, global"),
    ("miou_2class", "mIoU (2-class mean)", "background and tumour, global"),
    ("dice_all_images", "Dice (all images)", "per image, empty/empty = 1"),
    ("sensitivity", "Sensitivity", "tumour pixels, global"),
    ("specificity", "Specificity", "background pixels, global"),
    ("pixel_accuracy", "Pixel accuracy", "all pixels"),
    ("empty_fp_rate", "False-positive rate on empty masks", "images without tumour"),
    ("loss", "Test loss", "mean over images"),
]


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


def _loader(cfg: Config, dataset, batch_size: Optional[int], num_workers: Optional[int]) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size or cfg.eval.batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers if num_workers is None else num_workers)


@torch.no_grad()
def tune_threshold(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                   tta: bool = False, candidates: Optional[list[float]] = None, show_progress: bool = True
                   ) -> tuple[float, dict[float, float]]:
    """The segmentation threshold with the best per-image tumour Dice on `loader` (one pass, all candidates)."""
    from tqdm import tqdm

    candidates = candidates or [round(t, 2) for t in np.arange(0.2, 0.81, 0.05)]
    trackers = {t: MultiTaskMetrics(num_classes, CLASS_NAMES, threshold=t) for t in candidates}
    model.eval()
    for batch in tqdm(loader, desc="tuning threshold", leave=False, disable=not show_progress):
        batch = move_batch(batch, device)
        outputs = predict(model, batch["image"], tta=tta)
        for tracker in trackers.values():
            tracker.update(outputs, batch)
    scores = {t: tracker.compute()["dice"] for t, tracker in trackers.items()}
    best = max(scores, key=lambda t: (scores[t], -abs(t - 0.5)))
    return best, scores


def format_table(rows: list[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def summary_table(results: dict) -> str:
    rows = []
    for key, label, over in SUMMARY_ROWS:
        if key in results and isinstance(results[key], (int, float)) and math.isfinite(results[key]):
            value = results[key]
            shown = f"{value:.4f}" if key == "loss" else f"{100 * value:.2f} %"
            rows.append((label, shown, over))
    return format_table(rows, ("metric", "value", "averaged over"))


def run_test(opts: TestOptions) -> dict:
    """Evaluate `opts.checkpoint` on a split; write metrics.json, reports and figures; return the metrics."""
    from visualization.cases import save_case_grid
    from visualization.confusion import save_confusion_matrix
    from visualization.gradcam import write_gradcam_figures

    device = select_device(opts.device)
    model, cfg, ckpt = load_model_from_checkpoint(opts.checkpoint, device, use_ema=opts.use_ema)
    if opts.data_root:
        cfg.data.root = opts.data_root
        cfg.data.synthetic = False
    run_dir = Path(opts.checkpoint).resolve().parent
    split_path = run_dir / "split.json"
    out_dir = Path(opts.out_dir) if opts.out_dir else run_dir / f"test_{opts.split}{'_tta' if opts.tta else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    num_classes = cfg.model.num_classes

    threshold = cfg.eval.threshold if opts.threshold is None else opts.threshold
    tuning = None
    if opts.tune_threshold:
        val_ds = build_eval_dataset(cfg.data, "val", split_path)
        threshold, scores = tune_threshold(model, _loader(cfg, val_ds, opts.batch_size, opts.num_workers), device,
                                           num_classes, opts.tta, show_progress=opts.show_progress)
        tuning = {"best_threshold": threshold, "val_dice_by_threshold": {str(k): v for k, v in scores.items()}}
        print(f"threshold tuned on the validation split: {threshold:.2f} (val Dice {scores[threshold]:.4f})")

    dataset = build_eval_dataset(cfg.data, opts.split, split_path)
    metrics = MultiTaskMetrics(num_classes, CLASS_NAMES, threshold=threshold, keep_per_image=True)
    loss_fn = MultiTaskLoss(cfg.loss, class_counts=ckpt.get("class_counts")).to(device)
    results = evaluate(model, _loader(cfg, dataset, opts.batch_size, opts.num_workers), metrics, device, loss_fn,
                       eval_dtype(cfg.eval, device), tta=opts.tta, show_progress=opts.show_progress, desc=f"test {opts.split}")
    num_params = sum(p.numel() for p in model.parameters())
    results.update({
        "model": cfg.model.name, "params": num_params, "split": opts.split, "data_root": str(cfg.data.root),
        "num_images": len(dataset), "threshold": threshold, "tta": opts.tta, "checkpoint": str(opts.checkpoint),
        "epoch": ckpt.get("epoch"), "image_size": cfg.data.image_size, "ema_weights": bool(opts.use_ema and
                                                                                          ckpt.get("ema")),
    })
    if tuning:
        results["threshold_tuning"] = tuning
    write_json_atomic(results, out_dir / "metrics.json")

    report = metrics.classification_report(digits=4)
    (out_dir / "classification_report.txt").write_text(report + "\n", encoding="utf-8")
    (out_dir / "metric_definitions.md").write_text(METRIC_DEFINITIONS_MD + "\n", encoding="utf-8")
    save_confusion_matrix(results["confusion_matrix"], CLASS_NAMES, out_dir / "confusion_matrix.png")
    records = metrics.per_image_records()
    _write_per_image_csv(records, out_dir / "per_image.csv")
    _write_case_grids(model, dataset, records, cfg, device, threshold, opts.tta, out_dir, save_case_grid)
    if opts.gradcam > 0:
        write_gradcam_figures(model, dataset, out_dir / "gradcam", per_class=opts.gradcam, device=device,
                              class_names=CLASS_NAMES, target_layer=opts.gradcam_layer, mean=cfg.data.mean,
                              std=cfg.data.std)

    print(f"\n{cfg.model.name} ({num_params:,} parameters), {opts.split} split: {len(dataset)} images, "
          f"threshold {threshold:.2f}{', flip TTA' if opts.tta else ''}")
    print(summary_table(results))
    print("\nPer-class report (scikit-learn):\n" + report)
    print(f"results written to {out_dir}")
    return results


def _write_per_image_csv(records: list[dict], path: Path) -> None:
    if not records:
        return
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


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
