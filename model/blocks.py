"""Convolutional building blocks of EfficientMTNet (MobileNetV2 family), small and composable."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

Activation = Optional[Callable[[], nn.Module]]


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping more than 10 % (MobileNet rule)."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> activation; `act=None` leaves the output linear."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: Activation = nn.ReLU6) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation: reweight channels by a gate computed from their global average."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.gate(self.expand(self.act(self.reduce(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> (SE) -> linear projection 1x1, residual where shapes allow.

    `expansion=1` drops the expansion layer (the depthwise conv then works on the input channels directly).
    `se_ratio` sizes the SE bottleneck relative to the block's *input* channels (EfficientNet convention),
    which keeps SE cheap in parameters even when the expanded width is large; 0 disables SE.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: float = 6.0,
                 se_ratio: float = 0.0, act: Activation = nn.ReLU6) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = make_divisible(in_channels * expansion) if expansion != 1 else in_channels
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, act=act))
        layers.append(ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=act))
        if se_ratio > 0:
            layers.append(SqueezeExcite(hidden, make_divisible(in_channels * se_ratio)))
        layers.append(ConvBNAct(hidden, out_channels, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise 3x3 -> BN -> act -> pointwise 1x1 -> BN -> act: a cheap 3x3 smoothing / refinement layer."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, act: Activation = nn.ReLU) -> None:
        super().__init__(
            ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels, act=act),
            ConvBNAct(in_channels, out_channels, 1, act=act),
        )
