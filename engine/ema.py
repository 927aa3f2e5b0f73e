"""Exponential moving average of the weights, with a warm-up so that short runs evaluate useful weights.

With a fixed decay d the average after n updates still holds d**n of the random initialisation (0.998 after
300 steps: 55 %). The decay therefore ramps up as min(d, (1 + n) / (10 + n)), as in timm's and YOLO's EMA.

The update count lives on the host and all tensors are updated by one fused `torch._foreach_lerp_`, so an
optimiser step costs no device->host synchronisation (a per-tensor `float(count)` would cost hundreds on CUDA).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    """The EMA of `model`'s parameters and floating-point buffers (BatchNorm statistics) in `self.module`.

    Integer buffers (BatchNorm's `num_batches_tracked`) are copied. `n_averaged` counts the updates (a Python
    int, saved in checkpoints as `ema_updates`); the first update copies the weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.n_averaged = 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def current_decay(self) -> float:
        """The decay the next update uses (it follows the warm-up ramp)."""
        n = self.n_averaged
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        own = list(self.module.parameters()) + list(self.module.buffers())
        src = list(model.parameters()) + list(model.buffers())
        floats_own, floats_src = [], []
        for mine, theirs in zip(own, src):
            theirs = theirs.detach().to(mine.device)
            if mine.is_floating_point() and self.n_averaged > 0:
                floats_own.append(mine)
                floats_src.append(theirs)
            else:
                mine.copy_(theirs)
        if floats_own:
            # lerp_(avg, cur, w) = avg + w * (cur - avg) = d * avg + (1 - d) * cur with w = 1 - d.
            torch._foreach_lerp_(floats_own, floats_src, 1.0 - self.current_decay())
        self.n_averaged += 1


def build_ema(model: nn.Module, decay: float) -> ModelEma:
    """A `ModelEma` holding the EMA of `model`'s parameters and buffers."""
    return ModelEma(model, decay)
