"""Grad-CAM heatmaps for the classification head, computed with the `grad-cam` package (pytorch_grad_cam).

The package expects a model that returns a logits tensor; the multi-task models return a dict, so the model is
wrapped to expose `out["cls"]`. The default target layer is the deepest encoder stage
(`model.encoder_stages()[-1]`), whose features feed the global-context module and the classification head.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from datasets.brisc import IMAGENET_MEAN, IMAGENET_STD
from datasets.naming import CLASS_NAMES
from utils.checkpoint import unwrap_model
from utils.errors import InputError
from visualization.common import (GT_COLOUR, ArrayLike, PathLike, binary_masks, dataset_labels, display_images,
                                  jet_mappable, new_figure, paint_mask, plain_axis, save_figure, spread_indices,
                                  wrap_text)

TargetLayer = Union[nn.Module, str, None]


class ClassLogits(nn.Module):
    """Expose the classification logits of a multi-task model as a plain tensor output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["cls"]


@dataclass
class CamResult:
    heatmaps: np.ndarray  # (N, H, W) float32 in [0, 1], at the input resolution
    target_classes: list[int]  # the class each heatmap explains
    predicted_classes: list[int]
    probabilities: np.ndarray  # (N, num_classes) softmax of the logits


def resolve_target_layer(model: nn.Module, target_layer: TargetLayer = None) -> nn.Module:
    """The layer whose activations Grad-CAM weighs: a module, a dotted submodule name, or the default.

    The default is the last entry of `model.encoder_stages()`.
    """
    model = unwrap_model(model)
    if isinstance(target_layer, nn.Module):
        return target_layer
    if isinstance(target_layer, str):
        try:
            return model.get_submodule(target_layer)
        except AttributeError:
            stages = _stage_names(model)
            hint = f" Encoder stages: {', '.join(stages)}." if stages else ""
            raise InputError(f"Grad-CAM target layer '{target_layer}' is not a submodule of "
                             f"{type(model).__name__}.{hint}") from None
    if not hasattr(model, "encoder_stages"):
        raise ValueError(f"{type(model).__name__} has no encoder_stages(); pass the Grad-CAM target layer explicitly")
    stages = list(model.encoder_stages())
    if not stages:
        raise ValueError(f"{type(model).__name__}.encoder_stages() is empty; pass the Grad-CAM target layer explicitly")
    return stages[-1]


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """Dotted name of `layer` inside `model` (for figure titles); the class name when it is not a submodule."""
    for name, module in unwrap_model(model).named_modules():
        if module is layer:
            return name or type(layer).__name__
    return type(layer).__name__


def _stage_names(model: nn.Module) -> list[str]:
    if not hasattr(model, "encoder_stages"):
        return []
    return [layer_name(model, stage) for stage in model.encoder_stages()]


@contextlib.contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of a Grad-CAM pass, restored afterwards.

    Freezing the parameters keeps their `.grad` untouched (no weight gradients are needed); the input is
    made to require gradients instead, so the target layer's activations still carry a graph.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def gradcam_heatmaps(model: nn.Module, images: torch.Tensor, target_layer: TargetLayer = None,
                     target_classes: Optional[list[int]] = None) -> CamResult:
    """Grad-CAM of the classification logits for a batch of normalised images (N, C, H, W).

    `target_classes` gives the class to explain per image (None: the predicted class).
    """
    if images.ndim != 4:
        raise ValueError(f"Grad-CAM expects images of shape (N, C, H, W), got {tuple(images.shape)}")
    net = unwrap_model(model)
    layer = resolve_target_layer(net, target_layer)
    device = next(net.parameters()).device
    images = images.detach().float().to(device)
    with _explaining(net):
        with torch.no_grad():
            logits = net(images)["cls"].float()
        num_classes = logits.shape[1]
        predicted = logits.argmax(1).tolist()
        targets = predicted if target_classes is None else [int(c) for c in target_classes]
        if len(targets) != len(images):
            raise ValueError(f"{len(targets)} target classes for {len(images)} images")
        bad = [c for c in targets if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"Grad-CAM target classes {bad} are outside 0..{num_classes - 1}")
        heatmaps = None
        with GradCAM(model=ClassLogits(net), target_layers=[layer]) as cam:
            heatmaps = cam(input_tensor=images.requires_grad_(True),
                           targets=[ClassifierOutputTarget(c) for c in targets])
        if heatmaps is None or len(heatmaps) != len(images):  # the package swallows IndexErrors on exit
            raise RuntimeError(f"Grad-CAM failed on target layer '{layer_name(net, layer)}'")
    return CamResult(heatmaps=np.asarray(heatmaps, dtype=np.float32), target_classes=targets,
                     predicted_classes=predicted, probabilities=torch.softmax(logits, 1).cpu().numpy())


# ----------------------------------------------------------------------------------------- figures
def blend_heatmaps(rgb: np.ndarray, heatmaps: np.ndarray, image_weight: float = 0.55) -> list[np.ndarray]:
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
    result = gradcam_heatmaps(model, images, target_layer, target_classes)
    return blend_heatmaps(display_images(images, mean, std), result.heatmaps)


def save_gradcam_grid(images: ArrayLike, overlays: Sequence[np.ndarray], titles: Sequence[str], path: PathLike,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      masks: Optional[ArrayLike] = None, suptitle: Optional[str] = None,
                      max_columns: int = 5) -> Path:
    """Pairs of panels per image, the input (ground-truth outline when `masks` is given) above its Grad-CAM
    overlay, wrapped into blocks of at most `max_columns` images; returns the PNG path."""
    rgb = display_images(images, mean, std)
    count = len(rgb)
    if len(overlays) != count or len(titles) != count:
        raise ValueError(f"save_gradcam_grid: {count} images, {len(overlays)} overlays, {len(titles)} titles")
    truth = binary_masks(masks, count, "masks", rgb.shape[1:3]) if masks is not None else None
    blocks = math.ceil(count / max(1, max_columns))
    cols = math.ceil(count / blocks)  # balanced blocks: 6 images -> 2 x 3, not 5 + 1
    cell = 2.3
    fig = new_figure(cell * cols + 0.9, 2 * cell * blocks + 0.5 * blocks + 0.6)
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    for k in range(blocks * cols):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        plain_axis(top)
        plain_axis(bottom)
        if k >= count:
            top.set_visible(False)
            bottom.set_visible(False)
            continue
        top.imshow(rgb[k], interpolation="bilinear")
        if truth is not None:
            paint_mask(top, truth[k], GT_COLOUR, fill=False)
        top.set_title(wrap_text(titles[k], 26), fontsize=8)
        bottom.imshow(overlays[k], interpolation="bilinear")
        if k % cols == 0:
            top.set_ylabel("input", fontsize=9)
            bottom.set_ylabel("Grad-CAM", fontsize=9)
    mappable = jet_mappable()
    bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
    bar.set_label("class evidence (normalised per image)", fontsize=8)
    bar.set_ticks([0, 1], labels=["low", "high"])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return save_figure(fig, path)



def write_gradcam_figures(model: nn.Module, dataset, out_dir: PathLike, per_class: int = 4,
                          device: Union[str, torch.device, None] = None,
                          class_names: Sequence[str] = CLASS_NAMES, target_layer: Union[nn.Module, str, None] = None,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list[Path]:
    """Grad-CAM overlays of `per_class` images of every class: one PNG per class, `gradcam_<class>.png`.

    Images are spread evenly over each class's samples of `dataset` (items follow the batch contract). Each
    heatmap explains the predicted class; titles give the true and predicted class. `device`, when given,
    is where the model is moved first. Returns the written paths (classes without samples are skipped).
    """
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
        overlays = blend_heatmaps(display_images(images, mean, std), cams.heatmaps)
        titles = [f"{s['id']}\ntrue {name}\npred {class_names[p]} ({cams.probabilities[k, p]:.2f})"
                  for k, (s, p) in enumerate(zip(samples, cams.predicted_classes))]
        correct = sum(p == label for p in cams.predicted_classes)
        suptitle = (f"Grad-CAM of the predicted class: {name} images ({correct}/{len(chosen)} classified "
                    f"correctly)\ntarget layer: {layer_name(model, layer)}")
        written.append(save_gradcam_grid(images, overlays, titles, out_dir / f"gradcam_{name}.png", mean, std,
                                         masks=masks, suptitle=suptitle))
    return written


