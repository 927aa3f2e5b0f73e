"""Exponential moving average of the weights, with a warm-up so that short runs evaluate useful weights.

With a fixed decay d the average after n updates still holds d**n of the random initialisation (0.998 after
300 steps: 55 %). The decay therefore ramps up as min(d, (1 + n) / (10 + n)), as in timm's and YOLO's EMA.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An `AveragedModel` holding the EMA of `model`'s parameters and buffers (BatchNorm statistics)."""

    @torch.no_grad()
    def ema_update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged * d + current * (1.0 - d)

    return AveragedModel(model, avg_fn=ema_update, use_buffers=True)
