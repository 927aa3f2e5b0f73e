"""What the trainer reports per epoch and at the end: the console line and TensorBoard scalars and hparams."""
from __future__ import annotations

from typing import Optional

from engine.loops import EpochResult
from utils.config import Config, config_to_dict


def epoch_line(epoch: int, planned: int, result: EpochResult, val: dict, improved: bool, seconds: float) -> str:
    terms = result.terms
    seg = f" dice {val['dice']:.4f} iou {val['iou']:.4f}" if "dice" in val else ""  # absent: classification only
    train_acc = f" acc {result.accuracy:.3f}" if result.accuracy is not None else ""  # absent: segmentation only
    val_cls = f" acc {val['accuracy']:.4f} f1 {val['f1_macro']:.4f}" if "accuracy" in val else ""
    return (f"epoch {epoch:3d}/{planned} | loss {terms.get('total', float('nan')):.4f}{train_acc} "
            f"| val loss {val.get('loss', float('nan')):.4f}{val_cls}{seg} | "
            f"{result.images_per_second:.0f} img/s (loader wait {result.data_seconds:.1f}s) {seconds:.0f}s"
            f"{' *' if improved else ''}")


def summary_line(epochs: int, reason: str, monitor: str, best_metric: Optional[float], best_epoch: int,
                 minutes: float) -> str:
    """The end-of-training line; `best_metric` is None when no epoch was evaluated with a finite value."""
    best = (f"best {monitor} {best_metric:.4f} at epoch {best_epoch}" if best_metric is not None
            else f"no best {monitor} (no epoch was evaluated with a finite value; no best.pth)")
    return f"training ended after {epochs} epochs ({reason}); {best}; {minutes:.1f} min"


def write_epoch_scalars(writer, epoch: int, result: EpochResult, val: dict, lr: float) -> None:
    for name, value in result.terms.items():
        writer.add_scalar(f"train/{name}", value, epoch)
    if result.accuracy is not None:
        writer.add_scalar("train/accuracy", result.accuracy, epoch)
    writer.add_scalar("train/images_per_second", result.images_per_second, epoch)
    writer.add_scalar("lr", lr, epoch)
    for name, value in val.items():
        if isinstance(value, (int, float)):
            writer.add_scalar(f"val/{name}", value, epoch)


def write_hparams(writer, cfg: Config, best_row: dict) -> None:
    """The run's scalar settings beside the validation metrics of its best epoch (TensorBoard's HPARAMS tab)."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    best = {k.replace("val/", ""): float(v) for k, v in best_row.items()
            if k.startswith("val/") and isinstance(v, float)}
    if best:
        writer.add_hparams(flat, best, run_name="hparams")
