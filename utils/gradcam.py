"""Grad-CAM heatmaps for the classification head, computed with the `grad-cam` package (pytorch_grad_cam).

The package expects a model that returns a logits tensor; the multi-task models return a dict, so the model is
wrapped to expose `out["cls"]`. The default target layer is the deepest encoder stage
(`model.encoder_stages()[-1]`), whose features feed the global-context module and the classification head.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from utils.checkpoint import unwrap_model

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
            raise ValueError(f"Grad-CAM target layer '{target_layer}' is not a submodule of "
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
