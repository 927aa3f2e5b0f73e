"""Figures that explain the model and its results, saved as PNG with matplotlib's Agg backend.

    gradcam_overlays / save_gradcam_grid / write_gradcam_figures   Grad-CAM of the classification head
    save_case_grid                                                  input | ground truth | prediction rows
    confusion_matrix_figure / save_confusion_matrix                 confusion matrix (counts or row-normalised)
    plot_training_curves                                            loss terms, accuracy, Dice/IoU per epoch
    draw_architecture                                               EfficientMTNet block diagram
    compare_checkpoints                                             qualitative grid of several checkpoints

Command line (figures for the README):

    python -m utils.visualize compare --checkpoints runs/a/best.pth runs/b/best.pth [--split test] [--num 6]
    python -m utils.visualize curves --run runs/<experiment>/<timestamp> [--out curves.png]
    python -m utils.visualize architecture [--out images/architecture.png]

Figures are built on `matplotlib.figure.Figure` objects (no pyplot state), so they are safe in worker
processes and on machines without a display.
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
from matplotlib.ticker import MaxNLocator

from datasets.brisc import IMAGENET_MEAN, IMAGENET_STD
from datasets.naming import CLASS_NAMES
from utils.tb_figures import denormalize

PathLike = Union[str, Path]
ArrayLike = Union[torch.Tensor, np.ndarray]

GT_COLOUR = (0.1, 0.85, 0.2)
PRED_COLOUR = (0.95, 0.15, 0.1)
DPI = 120


# --------------------------------------------------------------------------------------------- basics
def _new_figure(width: float, height: float, layout: Optional[str] = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _display_images(images: ArrayLike, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (N, C, H, W) images -> (N, H, W, 3) float RGB in [0, 1]."""
    batch = torch.as_tensor(images).detach().cpu().float()
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(batch.shape)}")
    return denormalize(batch, list(mean), list(std)).permute(0, 2, 3, 1).numpy()


def _binary_masks(masks: ArrayLike, count: int, name: str, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) masks or probabilities -> (N, H, W) bool (threshold 0.5).

    `size`, when given, is the (H, W) the masks must have (that of the images they are drawn on)."""
    array = torch.as_tensor(masks).detach().cpu().float().numpy()
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[0] != count:
        raise ValueError(f"{name}: expected {count} masks of shape (N, 1, H, W) or (N, H, W), got {array.shape}")
    if size is not None and tuple(array.shape[1:]) != tuple(size):
        raise ValueError(f"{name}: masks of size {tuple(array.shape[1:])} do not match images of size {tuple(size)}")
    return array >= 0.5


def _plain_axis(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _paint_mask(ax, mask: np.ndarray, colour: tuple, alpha: float = 0.35, fill: bool = True,
                linestyle: str = "-") -> None:
    """A binary mask as a translucent fill and its outline."""
    if fill:
        rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
        rgba[mask] = (*colour, alpha)
        ax.imshow(rgba, interpolation="nearest")
    if mask.any() and not mask.all():  # a contour needs both sides of the level
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2, linestyles=linestyle)


def _wrap(text: str, width: int = 28) -> str:
    # Long tokens (file stems) stay whole: a broken id is harder to read than a wide title.
    return "\n".join(textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)
                     for line in text.split("\n"))


# --------------------------------------------------------------------------------------------- mask grids
@dataclass
class MaskColumn:
    """One column of a mask grid: a header and one binary mask per row; optional caption under each cell."""

    header: str
    masks: np.ndarray  # (N, H, W) bool
    captions: Optional[list[str]] = None


def _mask_grid(rgb: np.ndarray, truth: np.ndarray, predictions: list[MaskColumn], row_titles: list[str],
               suptitle: Optional[str] = None) -> Figure:
    """Rows of cases; columns: input, ground truth (green), then each prediction (red, ground truth dashed)."""
    rows, cols = len(rgb), 2 + len(predictions)
    cell = 2.3
    fig = _new_figure(cell * cols + 0.6, cell * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False)
    headers = ["input", "ground truth"] + [column.header for column in predictions]
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(rgb[r], interpolation="bilinear")
            _plain_axis(ax)
            if r == 0:
                ax.set_title(_wrap(headers[c], 24), fontsize=10, fontweight="bold")
            if c == 1:
                _paint_mask(ax, truth[r], GT_COLOUR)
            elif c >= 2:
                column = predictions[c - 2]
                _paint_mask(ax, truth[r], GT_COLOUR, fill=False, linestyle="--")
                _paint_mask(ax, column.masks[r], PRED_COLOUR)
                if column.captions is not None:
                    ax.set_xlabel(column.captions[r], fontsize=8)
        axes[r, 0].set_ylabel(_wrap(row_titles[r], 30), fontsize=8)
    handles = [Patch(facecolor=GT_COLOUR, alpha=0.6, label="ground truth (dashed outline on predictions)"),
               Patch(facecolor=PRED_COLOUR, alpha=0.6, label="prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return fig


def save_case_grid(images: ArrayLike, masks_true: ArrayLike, masks_pred: ArrayLike, titles: Sequence[str],
                   path: PathLike, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   suptitle: Optional[str] = None) -> Path:
    """Rows of cases with columns input / ground truth overlay / prediction overlay; returns the PNG path.

    `images` are normalised (N, C, H, W); masks are binary or probabilities (thresholded at 0.5), (N, 1, H, W)
    or (N, H, W); `titles` label the rows (e.g. the image id and its Dice).
    """
    rgb = _display_images(images, mean, std)
    if len(titles) != len(rgb):
        raise ValueError(f"save_case_grid: {len(titles)} titles for {len(rgb)} images")
    truth = _binary_masks(masks_true, len(rgb), "masks_true", rgb.shape[1:3])
    pred = _binary_masks(masks_pred, len(rgb), "masks_pred", rgb.shape[1:3])
    fig = _mask_grid(rgb, truth, [MaskColumn("prediction", pred)], list(titles), suptitle)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- Grad-CAM
def _blend_heatmaps(rgb: np.ndarray, heatmaps: np.ndarray, image_weight: float = 0.55) -> list[np.ndarray]:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return [show_cam_on_image(image.astype(np.float32), heat, use_rgb=True, image_weight=image_weight)
            for image, heat in zip(rgb, heatmaps)]


def gradcam_overlays(model: nn.Module, images: torch.Tensor, target_layer: Union[nn.Module, str, None] = None,
                     target_classes: Optional[list[int]] = None, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> list[np.ndarray]:
    """Grad-CAM heatmaps of the classification head blended over the images: one (H, W, 3) uint8 RGB each.

    `target_layer` is a module or a dotted submodule name (default: the last encoder stage); `target_classes`
    gives the class to explain per image (default: the predicted class).
    """
    from utils.gradcam import gradcam_heatmaps

    result = gradcam_heatmaps(model, images, target_layer, target_classes)
    return _blend_heatmaps(_display_images(images, mean, std), result.heatmaps)


def save_gradcam_grid(images: ArrayLike, overlays: Sequence[np.ndarray], titles: Sequence[str], path: PathLike,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      masks: Optional[ArrayLike] = None, suptitle: Optional[str] = None,
                      max_columns: int = 5) -> Path:
    """Pairs of panels per image, the input (ground-truth outline when `masks` is given) above its Grad-CAM
    overlay, wrapped into blocks of at most `max_columns` images; returns the PNG path."""
    rgb = _display_images(images, mean, std)
    count = len(rgb)
    if len(overlays) != count or len(titles) != count:
        raise ValueError(f"save_gradcam_grid: {count} images, {len(overlays)} overlays, {len(titles)} titles")
    truth = _binary_masks(masks, count, "masks", rgb.shape[1:3]) if masks is not None else None
    blocks = math.ceil(count / max(1, max_columns))
    cols = math.ceil(count / blocks)  # balanced blocks: 6 images -> 2 x 3, not 5 + 1
    cell = 2.3
    fig = _new_figure(cell * cols + 0.9, 2 * cell * blocks + 0.5 * blocks + 0.6)
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    for k in range(blocks * cols):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        _plain_axis(top)
        _plain_axis(bottom)
        if k >= count:
            top.set_visible(False)
            bottom.set_visible(False)
            continue
        top.imshow(rgb[k], interpolation="bilinear")
        if truth is not None:
            _paint_mask(top, truth[k], GT_COLOUR, fill=False)
        top.set_title(_wrap(titles[k], 26), fontsize=8)
        bottom.imshow(overlays[k], interpolation="bilinear")
        if k % cols == 0:
            top.set_ylabel("input", fontsize=9)
            bottom.set_ylabel("Grad-CAM", fontsize=9)
    mappable = _jet_mappable()
    bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
    bar.set_label("class evidence (normalised per image)", fontsize=8)
    bar.set_ticks([0, 1], labels=["low", "high"])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def _jet_mappable():
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    # OpenCV's COLORMAP_JET (used by the overlays) and matplotlib's "jet" are the same ramp.
    return ScalarMappable(norm=Normalize(0, 1), cmap=colormaps["jet"])


def dataset_labels(dataset) -> list[int]:
    """Class label of every sample, read from the index when the dataset exposes one (no image decoding)."""
    return [int(v) for v in _sample_field(dataset, "label")]


def dataset_ids(dataset) -> list[str]:
    """File stem of every sample, read from the index when the dataset exposes one (no image decoding)."""
    return [str(v) for v in _sample_field(dataset, "id")]


def _sample_field(dataset, key: str) -> list:
    indices = None
    base = dataset
    if isinstance(dataset, torch.utils.data.Subset):
        indices, base = list(dataset.indices), dataset.dataset
    samples = getattr(base, "samples", None)
    attr = "stem" if key == "id" else key
    if samples is not None and len(samples) == len(base) and all(hasattr(s, attr) for s in samples[:1]):
        values = [getattr(s, attr) for s in samples]
        return values if indices is None else [values[i] for i in indices]
    return [_as_scalar(dataset[i][key]) for i in range(len(dataset))]  # generic dataset: read every sample


def _as_scalar(value):
    return value.item() if torch.is_tensor(value) else value


def spread_indices(candidates: Sequence[int], count: int) -> list[int]:
    """`count` entries spread evenly over `candidates` (all of them when there are fewer): deterministic."""
    if count >= len(candidates):
        return list(candidates)
    positions = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[p] for p in positions]


def write_gradcam_figures(model: nn.Module, dataset, out_dir: PathLike, per_class: int = 4,
                          device: Union[str, torch.device, None] = None,
                          class_names: Sequence[str] = CLASS_NAMES, target_layer: Union[nn.Module, str, None] = None,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list[Path]:
    """Grad-CAM overlays of `per_class` images of every class: one PNG per class, `gradcam_<class>.png`.

    Images are spread evenly over each class's samples of `dataset` (items follow the batch contract). Each
    heatmap explains the predicted class; titles give the true and predicted class. `device`, when given,
    is where the model is moved first. Returns the written paths (classes without samples are skipped).
    """
    from utils.gradcam import gradcam_heatmaps, layer_name, resolve_target_layer

    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if device is not None:
        model.to(device)
    layer = resolve_target_layer(model, target_layer)
    labels = dataset_labels(dataset)
    out_dir = Path(out_dir)
    written = []
    for label, name in enumerate(class_names):
        chosen = spread_indices([i for i, y in enumerate(labels) if y == label], per_class)
        if not chosen:
            continue
        samples = [dataset[i] for i in chosen]
        images = torch.stack([s["image"] for s in samples])
        masks = torch.stack([s["mask"] for s in samples])
        cams = gradcam_heatmaps(model, images, layer)  # moves the images to the model's device
        overlays = _blend_heatmaps(_display_images(images, mean, std), cams.heatmaps)
        titles = [f"{s['id']}\ntrue {name}\npred {class_names[p]} ({cams.probabilities[k, p]:.2f})"
                  for k, (s, p) in enumerate(zip(samples, cams.predicted_classes))]
        correct = sum(p == label for p in cams.predicted_classes)
        suptitle = (f"Grad-CAM of the predicted class: {name} images ({correct}/{len(chosen)} classified "
                    f"correctly)\ntarget layer: {layer_name(model, layer)}")
        written.append(save_gradcam_grid(images, overlays, titles, out_dir / f"gradcam_{name}.png", mean, std,
                                         masks=masks, suptitle=suptitle))
    return written


# --------------------------------------------------------------------------------------------- confusion matrix
def confusion_matrix_figure(cm: Union[list, np.ndarray], class_names: Sequence[str] = CLASS_NAMES,
                            normalize: bool = False) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted class) as a matplotlib Figure.

    With `normalize`, cells show the share of each true class (row-normalised, i.e. recall on the diagonal)
    above the count; otherwise the counts, coloured by the row share.
    """
    counts = np.asarray(cm, dtype=np.float64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {k} class names")
    row_sums = counts.sum(1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    size = 1.1 * k + 2.2
    fig = _new_figure(size + 0.8, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            text = f"{shares[i, j]:.1%}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if shares[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    correct = int(np.trace(counts))
    ax.set_title(f"Confusion matrix: {total} images, accuracy {correct / max(total, 1):.2%}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class", fontsize=8)
    return fig


def save_confusion_matrix(cm: Union[list, np.ndarray], class_names: Sequence[str], path: PathLike,
                          normalize: bool = False) -> Path:
    """`confusion_matrix_figure` saved as a PNG; returns the path."""
    return _save(confusion_matrix_figure(cm, class_names, normalize), path)


# --------------------------------------------------------------------------------------------- training curves
def _is_loss_term(key: str) -> bool:
    """`train/<term>` keys that are loss terms (total, cls, seg*, aux*, *loss*), not accuracy or throughput."""
    if not key.startswith("train/"):
        return False
    term = key.split("/", 1)[1]
    return term in ("total", "loss", "cls") or term.startswith(("seg", "aux")) or "loss" in term


def _quantity(key: str) -> str:
    name = key.split("/", 1)[-1]
    return "total" if key == "val/loss" else name


def _series(history: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row.get("epoch", i + 1))
            ys.append(value)
    return xs, ys


def _load_history(history: Union[list, PathLike]) -> tuple[list[dict], str]:
    if isinstance(history, list):
        return history, ""
    path = Path(history)
    if path.is_dir():
        path = path / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"training history '{path}' does not exist (train.py writes history.json into "
                                f"each run directory)")
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"'{path}' must hold a JSON list of per-epoch objects")
    run = path.resolve().parent  # a `latest` link resolves to the timestamped run
    return rows, f"{run.parent.name}/{run.name}"


def plot_training_curves(history: Union[list, PathLike], out_path: PathLike) -> Path:
    """Per-epoch curves from a run's history (list of dicts, `history.json` or its run directory).

    Panels: every `train/*` loss term and `val/loss`; accuracy (and validation macro-F1); validation Dice and
    IoU (and training ones when logged). Returns the PNG path.
    """
    rows, run_name = _load_history(history)
    if not rows:
        raise ValueError("the training history is empty: nothing to plot (has an epoch finished?)")
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    loss_keys = [k for k in keys if _is_loss_term(k)] + [k for k in keys if k == "val/loss"]
    panels = [
        ("loss", loss_keys),
        ("accuracy", [k for k in ("train/accuracy", "val/accuracy", "val/f1_macro") if k in keys]),
        ("segmentation (tumour images)", [k for k in ("train/dice", "val/dice", "train/iou", "val/iou")
                                          if k in keys]),
    ]
    fig = _new_figure(15, 5.0)
    axes = fig.subplots(1, 3)
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    for ax, (title, series_keys) in zip(axes, panels):
        # One colour per quantity: a training curve and its validation twin share it (val/loss pairs with total).
        quantities = list(dict.fromkeys(_quantity(k) for k in series_keys))
        for key in series_keys:
            xs, ys = _series(rows, key)
            if not xs:
                continue
            style = "--" if key.startswith("val/") else "-"
            width = 2.2 if _quantity(key) == "total" else 1.4
            marker = "o" if len(xs) <= 30 else None
            colour = palette[quantities.index(_quantity(key)) % len(palette)]
            ax.plot(xs, ys, style, color=colour, linewidth=width, marker=marker, markersize=3, label=key)
        values = [v for line in ax.lines for v in line.get_ydata()]
        if title == "loss" and values and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")  # terms of very different size stay readable
        ax.set_title(title + (" (log scale)" if ax.get_yscale() == "log" else ""), fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:  # below the panel, so that no curve is hidden behind it
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[1].set_ylim(top=1.01)
    axes[2].set_ylim(top=1.01)
    fig.suptitle(f"Training curves{f' ({run_name})' if run_name else ''}: solid = training, dashed = validation",
                 fontsize=11)
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------- checkpoint comparison
def select_cases(labels: Sequence[int], num: int) -> list[int]:
    """`num` dataset indices covering every class in turn (round robin), spread evenly within each class.

    Deterministic: the same labels always give the same cases. Returned grouped by class.
    """
    per_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        per_class.setdefault(int(label), []).append(i)
    classes = sorted(per_class)
    quota = dict.fromkeys(classes, 0)
    total = min(num, len(labels))
    while sum(quota.values()) < total:
        for label in classes:
            if sum(quota.values()) < total and quota[label] < len(per_class[label]):
                quota[label] += 1
    return [i for label in classes for i in spread_indices(per_class[label], quota[label])]


def _case_caption(pred_mask: np.ndarray, true_mask: np.ndarray, class_name: str) -> str:
    """Predicted class, and the case's Dice (tumour images) or false-positive pixels (empty ground truth)."""
    if not true_mask.any():
        fp = int(pred_mask.sum())
        return f"{class_name} · {'no false positive' if fp == 0 else f'{fp} false-positive px'}"
    inter = float(np.logical_and(pred_mask, true_mask).sum())
    dice = 2 * inter / (float(pred_mask.sum()) + float(true_mask.sum()))
    return f"{class_name} · Dice {dice:.3f}"


@torch.no_grad()
def _predict_cases(model: nn.Module, images: torch.Tensor, threshold: float, size: tuple[int, int],
                   batch_size: int = 8) -> tuple[np.ndarray, list[int]]:
    """Binary masks resized (nearest) to `size` and predicted classes, in eval mode."""
    device = next(model.parameters()).device
    masks, classes = [], []
    for start in range(0, len(images), batch_size):
        out = model(images[start:start + batch_size].to(device))
        prob = torch.sigmoid(out["seg"].float())
        if tuple(prob.shape[-2:]) != size:
            prob = torch.nn.functional.interpolate(prob, size=size, mode="nearest")
        masks.append((prob[:, 0] >= threshold).cpu().numpy())
        classes.extend(out["cls"].argmax(1).tolist())
    return np.concatenate(masks), classes


def _default_names(paths: Sequence[Path], model_names: Sequence[str]) -> list[str]:
    """Model names, disambiguated by the run directory when two checkpoints hold the same model."""
    names = list(model_names)
    for i, name in enumerate(model_names):
        if list(model_names).count(name) > 1:
            names[i] = f"{name} ({paths[i].parent.name}/{paths[i].stem})"
    return names


def compare_checkpoints(checkpoints: Sequence[PathLike], out_path: PathLike = "images/comparison.png",
                        split: str = "test", data_root: Optional[PathLike] = None, num: int = 6,
                        labels: Optional[Sequence[str]] = None, device: Union[str, torch.device] = "cpu") -> Path:
    """Qualitative grid: rows of cases (deterministic, covering every class), columns input, ground truth
    and the prediction of each checkpoint. Returns the PNG path.

    Each model is rebuilt from its checkpoint and sees the split prepared with its own data config (image size,
    channels, normalisation); `split.json` beside each checkpoint defines the validation split. `data_root`
    replaces every checkpoint's `data.root`. Cases are chosen on the first checkpoint's dataset and matched by
    image id in the others.
    """
    from datasets.factory import build_eval_dataset
    from utils.checkpoint import load_model_from_checkpoint

    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise ValueError("compare: give at least one checkpoint")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"compare: {len(labels)} labels for {len(paths)} checkpoints")
    loaded = []
    for path in paths:
        model, cfg, ckpt = load_model_from_checkpoint(path, device)
        if data_root is not None:
            cfg.data.root = str(data_root)
        dataset = build_eval_dataset(cfg.data, split, path.parent / "split.json")
        loaded.append((model, cfg, ckpt.get("model_name") or cfg.model.name, dataset))

    reference_cfg, reference = loaded[0][1], loaded[0][3]
    class_names = list(getattr(reference, "class_names", CLASS_NAMES))
    cases = select_cases(dataset_labels(reference), num)
    samples = [reference[i] for i in cases]
    ids = [s["id"] for s in samples]
    images = torch.stack([s["image"] for s in samples])
    truth = _binary_masks(torch.stack([s["mask"] for s in samples]), len(cases), "ground truth", images.shape[-2:])
    size = tuple(truth.shape[-2:])

    names = list(labels) if labels is not None else _default_names(paths, [entry[2] for entry in loaded])
    columns = []
    for path, name, (model, cfg, _, dataset) in zip(paths, names, loaded):
        if dataset is reference:
            batch = images
        else:
            position = {stem: i for i, stem in enumerate(dataset_ids(dataset))}
            missing = [stem for stem in ids if stem not in position]
            if missing:
                raise ValueError(f"compare: image '{missing[0]}' of the first checkpoint's {split} split is not in "
                                 f"the {split} split of '{path}'; compare checkpoints on the same data")
            batch = torch.stack([dataset[position[stem]]["image"] for stem in ids])
        masks, predicted = _predict_cases(model, batch, cfg.eval.threshold, size)
        captions = [_case_caption(m, t, class_names[p]) for m, t, p in zip(masks, truth, predicted)]
        columns.append(MaskColumn(name, masks, captions))

    row_titles = [f"{stem}\ntrue: {class_names[int(s['label'])]}" for stem, s in zip(ids, samples)]
    suptitle = f"{split} split of {Path(reference_cfg.data.root).name}: predicted class · Dice of each model"
    rgb = _display_images(images, reference_cfg.data.mean, reference_cfg.data.std)
    return _save(_mask_grid(rgb, truth, columns, row_titles, suptitle), out_path)


# --------------------------------------------------------------------------------------------- architecture
@dataclass
class StageSummary:
    name: str
    channels: int
    stride: int
    detail: str  # block structure, e.g. "3 x MBConv e6 + SE"
    params: int


@dataclass
class ArchitectureSummary:
    """What the architecture figure shows, read from a built model by a probing forward pass."""

    image_size: int
    in_channels: int
    num_classes: int
    stages: list[StageSummary]
    context: str
    context_params: int
    decoder_channels: int
    decoder_strides: list[int]
    decoder_params: int
    seg_head: str
    seg_head_params: int
    aux_strides: list[int]
    aux_params: int
    cls_head: str
    cls_head_params: int
    total_params: int
    gflops: float


def _params(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _fmt_params(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count / 1e3:.1f} k" if count >= 1e3 else str(count)


def _stage_detail(stage: nn.Module) -> str:
    blocks = [m for m in stage.modules() if type(m).__name__ == "InvertedResidual"]
    has_se = any("SqueezeExcite" in type(m).__name__ for m in stage.modules())
    if not blocks:
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        return " + ".join(f"conv {c.kernel_size[0]}×{c.kernel_size[1]} /{c.stride[0]}" for c in convs[:2]) or "-"
    expansions = {_expansion(block) for block in blocks}
    expand = f" e{'/'.join(f'{e:g}' for e in sorted(expansions))}" if None not in expansions else ""
    return f"{len(blocks)} × MBConv{expand}{' + SE' if has_se else ''}"


def _expansion(block: nn.Module) -> Optional[float]:
    """Expansion ratio of an inverted residual: its first convolution is a 1x1 expansion, or none (ratio 1)."""
    first = next((m for m in block.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    if first.groups > 1:  # starts with the depthwise convolution: no expansion layer
        return 1.0
    return round(first.out_channels / first.in_channels, 1)


def _linear_chain(head: nn.Module) -> str:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    dropout = next((m.p for m in head.modules() if isinstance(m, nn.Dropout)), None)
    dims = " → ".join([str(linears[0].in_features)] + [str(m.out_features) for m in linears]) if linears else "-"
    return f"global average pool → FC {dims}" + (f"\n(ReLU, dropout {dropout:g})" if dropout is not None else "")


def _conv_chain(head: nn.Module) -> str:
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    parts = []
    for conv in convs:
        kind = "dw " if conv.groups > 1 and conv.groups == conv.in_channels else ""
        parts.append(f"{kind}{conv.kernel_size[0]}×{conv.kernel_size[1]} {conv.in_channels}→{conv.out_channels}")
    return "\n".join(parts) if parts else "-"


def describe_architecture(model: Optional[nn.Module] = None, image_size: int = 256) -> ArchitectureSummary:
    """Channels, strides, block structure and parameters of EfficientMTNet (built with defaults when None),
    read from the model: a forward pass at `image_size` with hooks on the encoder stages and the decoder."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from utils.checkpoint import unwrap_model
    from utils.gradcam import layer_name

    if model is None:
        from model import build_model

        model = build_model("efficient_mtnet")
    model = unwrap_model(model)
    required = ("encoder_stages", "context", "decoder", "seg_head", "cls_head")
    missing = [name for name in required if not hasattr(model, name)]
    if missing:
        raise ValueError(f"draw_architecture draws EfficientMTNet; {type(model).__name__} has no "
                         f"{', '.join(missing)}")
    probe = copy.deepcopy(model).float().cpu()  # the probe's training-mode pass must not touch the caller's BN stats
    in_channels = next(m for m in probe.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.zeros(1, in_channels, image_size, image_size)
    shapes: dict[int, torch.Size] = {}
    stages = probe.encoder_stages()
    hooks = [stage.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, o.shape))
             for k, stage in enumerate(stages)]
    levels: list[torch.Size] = []
    hooks.append(probe.decoder.register_forward_hook(lambda m, i, o: levels.extend(t.shape for t in o)))
    probe.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = probe(x)
    for hook in hooks:
        hook.remove()
    probe.train()
    with torch.no_grad():
        aux = probe(x).get("aux", [])
    names = [layer_name(probe, stage).split(".")[-1] for stage in stages]
    stage_rows = [StageSummary(names[k], int(shapes[k][1]), image_size // int(shapes[k][-1]),
                               _stage_detail(stage), _params(stage)) for k, stage in enumerate(stages)]
    ham = next((m for m in probe.context.modules() if hasattr(m, "rank") and hasattr(m, "train_steps")), None)
    bread = next((m for m in probe.context.modules() if isinstance(m, nn.Conv2d)), None)
    context = type(probe.context).__name__
    if ham is not None and bread is not None:
        context = (f"lower bread 1×1 {bread.in_channels}→{bread.out_channels}, ReLU\nham: NMF rank {ham.rank}, "
                   f"{ham.train_steps}/{ham.eval_steps} steps (train/eval)\nupper bread 1×1 {bread.out_channels}→"
                   f"{bread.in_channels}, BN; + residual")
    aux_heads = getattr(probe, "aux_heads", None)
    return ArchitectureSummary(
        image_size=image_size, in_channels=in_channels, num_classes=int(out["cls"].shape[1]), stages=stage_rows,
        context=context, context_params=_params(probe.context),
        decoder_channels=int(levels[0][1]) if levels else 0,
        decoder_strides=[image_size // int(s[-1]) for s in levels], decoder_params=_params(probe.decoder),
        seg_head=_conv_chain(probe.seg_head), seg_head_params=_params(probe.seg_head),
        aux_strides=[image_size // int(a.shape[-1]) for a in aux], aux_params=_params(aux_heads),
        cls_head=_linear_chain(probe.cls_head), cls_head_params=_params(probe.cls_head),
        total_params=_params(probe), gflops=counter.get_total_flops() / 1e9)


class _Diagram:
    """Boxes (centre x, y, width, height in data units) and arrows between their edges on one axis."""

    def __init__(self, ax) -> None:
        self.ax = ax

    def box(self, x: float, y: float, w: float, h: float, title: str, body: str = "", colour: str = "#dbe9f6",
            dashed: bool = False, title_size: float = 10.5, body_size: float = 8.5) -> tuple:
        patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                               facecolor=colour, edgecolor="#37474f", linewidth=1.3,
                               linestyle="--" if dashed else "-", zorder=2)
        self.ax.add_patch(patch)
        if body:
            self.ax.text(x, y + h / 2 - 0.16, title, ha="center", va="top", fontsize=title_size,
                         fontweight="bold", zorder=3)
            self.ax.text(x, y - 0.12, body, ha="center", va="center", fontsize=body_size, zorder=3,
                         linespacing=1.25)
        else:
            self.ax.text(x, y, title, ha="center", va="center", fontsize=title_size, fontweight="bold", zorder=3)
        return (x, y, w, h)

    def group(self, x0: float, x1: float, y0: float, y1: float, label: str, colour: str) -> None:
        self.ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0.02,rounding_size=0.25",
                                         facecolor=colour, edgecolor="none", alpha=0.55, zorder=0))
        self.ax.text(x0 + 0.15, y1 - 0.12, label, ha="left", va="top", fontsize=9, style="italic",
                     color="#37474f", zorder=1)

    @staticmethod
    def edge(box: tuple, side: str) -> tuple[float, float]:
        x, y, w, h = box
        return {"left": (x - w / 2, y), "right": (x + w / 2, y), "top": (x, y + h / 2),
                "bottom": (x, y - h / 2)}[side]

    def arrow(self, start: tuple[float, float], end: tuple[float, float], label: str = "", dashed: bool = False,
              label_offset: tuple[float, float] = (0.0, 0.18)) -> None:
        self.ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.4,
                                          color="#37474f", linestyle="--" if dashed else "-", zorder=1,
                                          shrinkA=0, shrinkB=0))
        if label:
            mx, my = (start[0] + end[0]) / 2 + label_offset[0], (start[1] + end[1]) / 2 + label_offset[1]
            self.ax.text(mx, my, label, ha="center", va="bottom", fontsize=8, color="#37474f", zorder=3,
                         bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})


def draw_architecture(out_path: PathLike = "images/architecture.png", model: Optional[nn.Module] = None,
                      image_size: int = 256) -> Path:
    """A block diagram of EfficientMTNet whose channels, strides, blocks and parameter counts are read from the
    model (the default-configured one when `model` is None). Returns the PNG path."""
    info = describe_architecture(model, image_size)
    if len(info.stages) < 2 or len(info.decoder_strides) < 2:
        raise ValueError("draw_architecture expects a stem, encoder stages and a multi-level decoder")
    fig = _new_figure(18.5, 10.5, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 19.9)
    ax.set_ylim(0, 11.2)
    ax.axis("off")
    d = _Diagram(ax)
    enc_c, ctx_c, dec_c, head_c, io_c = "#dbe9f6", "#fde4c8", "#dff2df", "#f3dcef", "#eeeeee"

    # Row 1: input, stem and stages, Hamburger.
    y_enc, w, h, step = 7.7, 2.4, 1.5, 2.7
    xs = [1.45 + step * k for k in range(len(info.stages) + 2)]
    d.group(0.1, xs[len(info.stages)] + w / 2 + 0.15, y_enc - h / 2 - 0.25, y_enc + h / 2 + 0.55,
            f"encoder (MobileNetV2 inverted residuals): {_fmt_params(sum(s.params for s in info.stages))} params",
            "#eef4fb")
    boxes = [d.box(xs[0], y_enc, w - 0.4, h, "input", f"{info.in_channels} × H × W\n(e.g. {info.image_size}×"
                   f"{info.image_size})", io_c)]
    for k, stage in enumerate(info.stages):
        body = f"{stage.detail}\n{stage.channels} ch, 1/{stage.stride}\n{_fmt_params(stage.params)} params"
        boxes.append(d.box(xs[k + 1], y_enc, w, h, stage.name, body, enc_c))
    for a, b in zip(boxes, boxes[1:]):
        d.arrow(d.edge(a, "right"), d.edge(b, "left"))
    ham = d.box(xs[-1] + 0.4, y_enc, 3.2, 1.9, "Hamburger (NMF)", info.context + f"\n{_fmt_params(info.context_params)}"
                " params", ctx_c, body_size=8)
    d.arrow(d.edge(boxes[-1], "right"), d.edge(ham, "left"))

    # Row 0: classification head on the pooled Hamburger features.
    y_cls = 10.2
    cls = d.box(ham[0] - 1.2, y_cls, 4.2, 1.25, "classification head",
                info.cls_head + f", {_fmt_params(info.cls_head_params)} params", head_c, body_size=8)
    logits = d.box(cls[0] - 4.9, y_cls, 2.8, 0.9, f"class logits\nB × {info.num_classes}", colour=io_c,
                   title_size=9.5)
    d.arrow((ham[0], ham[1] + ham[3] / 2), (ham[0], cls[1] - cls[3] / 2))
    d.arrow(d.edge(cls, "left"), d.edge(logits, "right"))

    # Row 2: FPN levels, finest first; laterals from the stages that feed the decoder (deepest from Hamburger).
    y_fpn = 4.55
    strides = info.decoder_strides
    feeding = [k for k, s in enumerate(info.stages) if s.stride in strides]
    level_boxes = {}
    for stride in strides:
        k = next(i for i in feeding if info.stages[i].stride == stride)
        level_boxes[stride] = d.box(xs[k + 1], y_fpn, w, 1.15, f"level 1/{stride}",
                                    f"lateral 1×1 → {info.decoder_channels} ch", dec_c, body_size=8.5)
    deepest = max(strides)
    for stride, level in level_boxes.items():
        source = ham if stride == deepest else boxes[1 + next(i for i in feeding if info.stages[i].stride == stride)]
        if stride == deepest:
            d.arrow((ham[0] - 0.6, ham[1] - ham[3] / 2), d.edge(level, "right"))
        else:
            d.arrow(d.edge(source, "bottom"), d.edge(level, "top"))
    ordered = sorted(level_boxes)
    for coarse, fine in zip(ordered[:0:-1], ordered[-2::-1]):
        d.arrow(d.edge(level_boxes[coarse], "left"), d.edge(level_boxes[fine], "right"))
    # The decoder's legend sits in the free space left of its finest level, away from the lateral arrows.
    d.group(0.1, level_boxes[ordered[-1]][0] + w / 2 + 0.15, y_fpn - 0.85, y_fpn + 0.85, "", "#eef8ee")
    ax.text(xs[0] + 0.9, y_fpn, f"FPN decoder\n{_fmt_params(info.decoder_params)} params\n\ntop-down (←):\n"
            f"upsample ×2, add the\nlateral, depthwise-separable\n3×3 smoothing", ha="center", va="center",
            fontsize=9, color="#37474f", style="italic", zorder=3)

    # Row 3: segmentation head on the finest level; auxiliary heads (training only) on deeper ones.
    y_head = 1.75
    finest = level_boxes[ordered[0]]
    seg = d.box(finest[0], y_head, w, 1.5, "segmentation head",
                f"{info.seg_head}\n{_fmt_params(info.seg_head_params)} params", head_c, body_size=8)
    mask = d.box(seg[0] - 4.1, y_head, 3.0, 1.0, "mask logits\nB × 1 × H × W", colour=io_c, title_size=9.5)
    d.arrow(d.edge(finest, "bottom"), d.edge(seg, "top"))
    d.arrow(d.edge(seg, "left"), d.edge(mask, "right"), f"bilinear ×{ordered[0]}", label_offset=(0, 0.1))
    for stride in info.aux_strides:
        if stride not in level_boxes:
            continue
        level = level_boxes[stride]
        aux = d.box(level[0], y_head, w, 1.1, f"aux head 1/{stride}", "1×1 → 1 (training only)", "#fafafa",
                    dashed=True, title_size=9.5, body_size=8)
        d.arrow(d.edge(level, "bottom"), d.edge(aux, "top"), dashed=True)
    if info.aux_strides:
        ax.text(level_boxes[max(info.aux_strides)][0] + w / 2 + 0.3, y_head,
                f"deep supervision:\n{_fmt_params(info.aux_params)} params,\ndropped at inference",
                ha="left", va="center", fontsize=8.5, style="italic", color="#37474f")

    inference = info.total_params - info.aux_params
    ax.text(9.95, 0.2, f"EfficientMTNet: {_fmt_params(inference)} parameters at inference "
            f"({_fmt_params(info.total_params)} with the auxiliary heads), {info.gflops:.2f} GFLOPs at "
            f"{info.image_size}×{info.image_size} (torch FlopCounterMode).\nDrawn by "
            f"`python -m utils.visualize architecture` from the built model.",
            ha="center", va="bottom", fontsize=9.5, color="#455a64")
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.visualize", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser("compare", help="qualitative grid: input, ground truth, prediction of each checkpoint")
    compare.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint files (in their run dirs)")
    compare.add_argument("--split", default="test", choices=["val", "test"])
    compare.add_argument("--data-root", default=None, help="dataset root replacing the checkpoints' data.root")
    compare.add_argument("--num", type=int, default=6, help="number of cases (rows)")
    compare.add_argument("--out", default="images/comparison.png")
    compare.add_argument("--labels", nargs="+", default=None, help="column titles, one per checkpoint")
    compare.add_argument("--device", default="cpu")

    curves = sub.add_parser("curves", help="training curves from a run's history.json")
    curves.add_argument("--run", required=True, help="run directory (or its history.json)")
    curves.add_argument("--out", default=None, help="PNG path (default: <run>/curves.png)")

    arch = sub.add_parser("architecture", help="EfficientMTNet block diagram")
    arch.add_argument("--out", default="images/architecture.png")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        if args.labels is not None and len(args.labels) != len(args.checkpoints):
            parser.error(f"--labels: {len(args.labels)} labels for {len(args.checkpoints)} checkpoints")
        if args.num < 1:
            parser.error("--num must be >= 1")
        path = compare_checkpoints(args.checkpoints, args.out, args.split, args.data_root, args.num, args.labels,
                                   args.device)
    elif args.command == "curves":
        run = Path(args.run)
        out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "curves.png"
        path = plot_training_curves(run, out)
    else:
        path = draw_architecture(args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
