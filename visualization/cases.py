"""Case grids: input | ground truth | prediction rows, and the same cases predicted by several checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from datasets.brisc import IMAGENET_MEAN, IMAGENET_STD
from datasets.naming import CLASS_NAMES
from model import model_tasks
from utils.errors import InputError
from visualization.common import (GT_COLOUR, PRED_COLOUR, ArrayLike, PathLike, binary_masks, dataset_ids,
    dataset_labels, display_images, new_figure, paint_mask, plain_axis, save_figure, spread_indices,
    wrap_text)


@dataclass
class MaskColumn:
    """One column of a mask grid: a header and one binary mask per row; optional caption under each cell."""

    header: str
    masks: np.ndarray  # (N, H, W) bool
    captions: Optional[list[str]] = None


def mask_grid(rgb: np.ndarray, truth: np.ndarray, predictions: list[MaskColumn], row_titles: list[str],
               suptitle: Optional[str] = None) -> Figure:
    """Rows of cases; columns: input, ground truth (green), then each prediction (red, ground truth dashed)."""
    rows, cols = len(rgb), 2 + len(predictions)
    cell = 2.3
    fig = new_figure(cell * cols + 0.6, cell * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False)
    headers = ["input", "ground truth"] + [column.header for column in predictions]
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(rgb[r], interpolation="bilinear")
            plain_axis(ax)
            if r == 0:
                ax.set_title(wrap_text(headers[c], 24), fontsize=10, fontweight="bold")
            if c == 1:
                paint_mask(ax, truth[r], GT_COLOUR)
            elif c >= 2:
                column = predictions[c - 2]
                paint_mask(ax, truth[r], GT_COLOUR, fill=False, linestyle="--")
                paint_mask(ax, column.masks[r], PRED_COLOUR)
                if column.captions is not None:
                    ax.set_xlabel(column.captions[r], fontsize=8)
        axes[r, 0].set_ylabel(wrap_text(row_titles[r], 30), fontsize=8)
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
    rgb = display_images(images, mean, std)
    if len(titles) != len(rgb):
        raise ValueError(f"save_case_grid: {len(titles)} titles for {len(rgb)} images")
    truth = binary_masks(masks_true, len(rgb), "masks_true", rgb.shape[1:3])
    pred = binary_masks(masks_pred, len(rgb), "masks_pred", rgb.shape[1:3])
    fig = mask_grid(rgb, truth, [MaskColumn("prediction", pred)], list(titles), suptitle)
    return save_figure(fig, path)


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
    prefix = f"{class_name} · " if class_name else ""  # no class: a segmentation-only run
    if not true_mask.any():
        fp = int(pred_mask.sum())
        return f"{prefix}{'no false positive' if fp == 0 else f'{fp} false-positive px'}"
    inter = float(np.logical_and(pred_mask, true_mask).sum())
    dice = 2 * inter / (float(pred_mask.sum()) + float(true_mask.sum()))
    return f"{prefix}Dice {dice:.3f}"


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
        # a segmentation-only run (model.tasks without "cls") has no trained class to show
        has_cls = "cls" in out and "cls" in model_tasks(model)
        classes.extend(out["cls"].argmax(1).tolist() if has_cls else [None] * len(prob))
    return np.concatenate(masks), classes


def _geometry(dataset) -> tuple:
    """What decides where an image sits on a dataset's square input (the head margin only matters for head)."""
    resize = getattr(dataset, "resize", "stretch")
    return (resize, getattr(dataset, "head_margin", None) if resize == "head" else None)


def masks_in_frame(masks: np.ndarray, stems: Sequence[str], own, reference) -> np.ndarray:
    """(N, H, W) bool masks predicted on `own` dataset's square inputs, drawn in `reference`'s square frame
    (H = W = its input size): through each image's original frame (`logits_to_original` with `own`'s
    placement, then `to_square` with `reference`'s) when the two place images differently (stretch, letterbox,
    head); a nearest-neighbour resize when they place them alike."""
    from datasets.decode import to_square
    from datasets.geometry import logits_to_original

    size = int(reference.image_size)
    masks = np.asarray(masks, dtype=bool)
    if _geometry(own) == _geometry(reference):
        resized = torch.nn.functional.interpolate(torch.from_numpy(masks[:, None]).float(), size=(size, size),
                                                  mode="nearest")
        return resized[:, 0].numpy() > 0.5
    out = np.zeros((len(masks), size, size), dtype=bool)
    for n, (mask, stem) in enumerate(zip(masks, stems)):
        placement = own.placement(stem)
        logits = torch.from_numpy(np.where(mask, 10.0, -10.0).astype(np.float32))[None, None]
        original = logits_to_original(logits, placement.original_hw, placement)[0, 0].numpy() > 0
        out[n] = to_square(original.astype(np.uint8) * 255, size, reference.placement(stem), is_mask=True) > 0
    return out


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
    image id in the others; a checkpoint that places images otherwise (`data.preprocess.resize`) has its masks redrawn in
    the first one's frame (`masks_in_frame`).
    """
    from datasets.factory import build_eval_dataset
    from model.loading import load_model_from_checkpoint

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
    truth = binary_masks(torch.stack([s["mask"] for s in samples]), len(cases), "ground truth", images.shape[-2:])
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
                raise InputError(f"compare: image '{missing[0]}' of the first checkpoint's {split} split is not in "
                                 f"the {split} split of '{path}'; compare checkpoints on the same data")
            batch = torch.stack([dataset[position[stem]]["image"] for stem in ids])
        if dataset is reference or _geometry(dataset) == _geometry(reference):
            masks, predicted = _predict_cases(model, batch, cfg.eval.threshold, size)
        else:
            masks, predicted = _predict_cases(model, batch, cfg.eval.threshold, tuple(batch.shape[-2:]))
            masks = masks_in_frame(masks, ids, dataset, reference)
        captions = [_case_caption(m, t, "" if p is None else class_names[p])
                    for m, t, p in zip(masks, truth, predicted)]
        columns.append(MaskColumn(name, masks, captions))

    row_titles = [f"{stem}\ntrue: {class_names[int(s['label'])]}" for stem, s in zip(ids, samples)]
    suptitle = f"{split} split of {Path(reference_cfg.data.root).name}: predicted class · Dice of each model"
    rgb = display_images(images, reference_cfg.data.preprocess.mean, reference_cfg.data.preprocess.std)
    return save_figure(mask_grid(rgb, truth, columns, row_titles, suptitle), out_path)


