"""Classification-only comparison models: `efficientnet_b0_cls`.

A classification-only model honours the output contract without a segmentation output: `forward(x)` returns
`{"cls": (B, num_classes) logits}` and no `seg` key (never a fake mask). Its class attribute `tasks` is
`("cls",)`; a run with it sets `loss.seg_weight: 0` and `loss.aux_weights: []`, and the loss, the metrics,
`test.py` and `benchmark.py` skip the segmentation task when the output has no `seg`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import timm
import torch
import torch.nn as nn

from .pretrained import hub_download, init_pretrained, wants_imagenet
from .registry import register_model


class TimmClassifier(nn.Module):
    """A timm backbone (its own classifier removed, global average pooling kept) -> dropout -> a new linear head.

    `encoder` is the timm network, so a local weights file may be the library's ImageNet checkpoint (its
    `classifier.*` keys are dropped) or `model.encoder.state_dict()`.
    """

    tasks = ("cls",)

    def __init__(self, variant: str, num_classes: int = 4, in_channels: int = 3, pretrained: Optional[str] = None,
                 dropout: float = 0.2, name: str = "") -> None:
        super().__init__()
        name = name or variant
        hub = wants_imagenet(pretrained, name)
        with hub_download(name) if hub else contextlib.nullcontext():
            self.encoder = timm.create_model(variant, pretrained=hub, num_classes=0, in_chans=in_channels)
        self.cls_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.num_features, num_classes))
        init_pretrained(self, pretrained, name)

    def encoder_stages(self) -> list[nn.Module]:
        """Stem, then the network's stages (EfficientNet: 7 stages of blocks, strides 2 to 32)."""
        net = self.encoder
        return [nn.Sequential(net.conv_stem, net.bn1), *net.blocks]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": self.cls_head(self.encoder(x))}


@register_model("efficientnet_b0_cls")
def efficientnet_b0_cls(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                        pretrained: Optional[str] = None, **kwargs) -> TimmClassifier:
    """EfficientNet-B0 (timm) with a new classification head, no segmentation output (about 4.0 M parameters)."""
    return TimmClassifier("efficientnet_b0", num_classes, in_channels, pretrained, name="efficientnet_b0_cls",
                          **kwargs)
