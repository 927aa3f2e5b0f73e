"""SegNeXt-T (Guo et al., NeurIPS 2022, "SegNeXt: Rethinking Convolutional Attention Design for Semantic
Segmentation"): the MSCAN-T encoder and the LightHam decoder, with a classification head.

Neither timm nor segmentation_models_pytorch provides MSCAN, so it is written here from the paper's facts:

- stem: two 3x3 stride-2 convs (BN, GELU between) to stride 4; later stages start with a 3x3 stride-2 conv + BN;
- block: x + s1 * attention(BN(x)), then x + s2 * mlp(BN(x)), layer scales s initialised to 0.01, stochastic depth;
  attention = 1x1 conv -> GELU -> multi-scale convolutional attention -> 1x1 conv, plus its own shortcut;
  multi-scale convolutional attention: a 5x5 depthwise conv, three depthwise strip-conv pairs (1xk then kx1,
  k = 7, 11, 21) summed with it, a 1x1 conv, and the result multiplies the input (the attention weights);
  mlp = 1x1 conv (expand) -> 3x3 depthwise conv -> GELU -> 1x1 conv;
- each stage ends with a LayerNorm over channels; MSCAN-T: widths 32/64/160/256, depths 3/3/5/2,
  mlp ratios 8/8/4/4, drop-path 0.1.

LightHam (SegNeXt-T): the stride-8/16/32 features, resized to stride 8 and concatenated, are squeezed by a 1x1
conv (GroupNorm, ReLU) to 256 channels, pass the project's Hamburger (NMF, rank 16) and a 1x1 align conv, then
dropout and a 1x1 conv give the mask logits. The official MSCAN-T ImageNet checkpoint (mmsegmentation key
names) loads with `pretrained=/path/to/mscan_t.pth` (`MSCAN.convert_state_dict` renames its keys).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from .baselines import MultiTaskBaseline, classification_head
from .pretrained import init_pretrained, wants_imagenet
from .hamburger import Hamburger
from .registry import register_model


class MultiScaleConvAttention(nn.Module):
    """Depthwise 5x5 + strip convs (1xk, kx1) at several k, summed, mixed by a 1x1 conv; gates the input."""

    def __init__(self, dim: int, strip_kernels: Sequence[int] = (7, 11, 21)) -> None:
        super().__init__()
        self.local = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.strips = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim),
                          nn.Conv2d(dim, dim, (k, 1), padding=(k // 2, 0), groups=dim))
            for k in strip_kernels)
        self.mix = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.local(x)
        attn = attn + sum(strip(attn) for strip in self.strips)
        return self.mix(attn) * x


class SpatialAttention(nn.Module):
    """1x1 conv -> GELU -> multi-scale convolutional attention -> 1x1 conv, with a shortcut."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = MultiScaleConvAttention(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))


class ConvMlp(nn.Module):
    """1x1 conv (expand) -> 3x3 depthwise conv -> GELU -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class MSCABlock(nn.Module):
    """Pre-norm block: attention and MLP residual branches, each scaled by a learned per-channel layer scale."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0, layer_scale: float = 1e-2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MSCANStage(nn.Module):
    """Downsampling embedding, MSCA blocks, channel LayerNorm."""

    def __init__(self, embed: nn.Module, dim: int, depth: int, mlp_ratio: float, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.Sequential(*(MSCABlock(dim, mlp_ratio, drop_paths[i]) for i in range(depth)))
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))


class MSCAN(nn.Module):
    """Multi-scale convolutional attention network; returns the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 160, 256),
                 depths: Sequence[int] = (3, 3, 5, 2), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 drop_path_rate: float = 0.1) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0] // 2, 3, stride=2, padding=1), nn.BatchNorm2d(widths[0] // 2), nn.GELU(),
            nn.Conv2d(widths[0] // 2, widths[0], 3, stride=2, padding=1), nn.BatchNorm2d(widths[0]))
        stages = []
        for i, (dim, depth, ratio) in enumerate(zip(widths, depths, mlp_ratios)):
            embed = stem if i == 0 else nn.Sequential(nn.Conv2d(widths[i - 1], dim, 3, stride=2, padding=1),
                                                      nn.BatchNorm2d(dim))
            start = sum(depths[:i])
            stages.append(MSCANStage(embed, dim, depth, ratio, rates[start:start + depth]))
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(widths)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # fan-out He init, as in the reference implementation
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    # Key names of the official release (mmsegmentation's MSCAN) -> this module's.
    _RENAMES = (
        (r"^patch_embed1\.proj\.", "stages.0.embed."),
        (r"^patch_embed(\d)\.proj\.", lambda m: f"stages.{int(m[1]) - 1}.embed.0."),
        (r"^patch_embed(\d)\.norm\.", lambda m: f"stages.{int(m[1]) - 1}.embed.1."),
        (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
        (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
        (r"\.spatial_gating_unit\.conv0\.", ".spatial_gating_unit.local."),
        (r"\.spatial_gating_unit\.conv(\d)_(\d)\.", lambda m: f".spatial_gating_unit.strips.{m[1]}.{int(m[2]) - 1}."),
        (r"\.spatial_gating_unit\.conv3\.", ".spatial_gating_unit.mix."),
        (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    )

    @classmethod
    def convert_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of an official MSCAN checkpoint (optionally under `backbone.`); others pass unchanged."""
        converted = {}
        for key, value in state.items():
            key = key[len("backbone."):] if key.startswith("backbone.") else key
            for pattern, replacement in cls._RENAMES:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
        return converted


class LightHamHead(nn.Module):
    """Concatenate the stride-8/16/32 features at stride 8 -> squeeze -> Hamburger (NMF) -> align -> mask logits."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256, ham_channels: int = 256, rank: int = 16,
                 inv_t: float = 100.0, dropout: float = 0.1, groups: int = 32) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(sum(in_channels), ham_channels, 1, bias=False),
                                     nn.GroupNorm(groups, ham_channels), nn.ReLU(inplace=True))
        self.hamburger = Hamburger(ham_channels, ham_channels=ham_channels, rank=rank, inv_t=inv_t)
        self.align = nn.Sequential(nn.Conv2d(ham_channels, channels, 1, bias=False),
                                   nn.GroupNorm(groups, channels), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, 1, 1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = torch.cat([features[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                       for f in features[1:]], dim=1)
        return self.classifier(self.align(self.hamburger(self.squeeze(x))))


@register_model("segnext")
class SegNeXt(MultiTaskBaseline):
    """SegNeXt-T (MSCAN-T + LightHam, about 4.3 M parameters) with a pooled classification head."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                 pretrained: Optional[str] = None, drop_path_rate: float = 0.1, ham_channels: int = 256,
                 rank: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        wants_imagenet(pretrained, "segnext", available=False,
                       hint=" (the official MSCAN-T ImageNet checkpoint, mscan_t_*.pth, loads as such a file)")
        self.encoder = MSCAN(in_channels, drop_path_rate=drop_path_rate)
        self.decoder = LightHamHead(self.encoder.out_channels[1:], channels=256, ham_channels=ham_channels,
                                    rank=rank, dropout=dropout)
        self.cls_head = classification_head(self.encoder.out_channels[-1], num_classes, dropout)
        init_pretrained(self, pretrained, "segnext")

    def encoder_stages(self) -> list[nn.Module]:
        return list(self.encoder.stages)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.decoder(features[1:]), self.cls_head(features[-1])
