"""`hac_caspp_unet`: a base U-Net built from Hierarchical Attention Convolution (HAC) blocks with a Context
Aggregation Spatial Pyramid Pooling (CASPP) bottleneck, trained from scratch; multi-task like every registry model.

The published comparison describes the blocks only in words: HAC = multi-branch convolutions at growing receptive
fields whose outputs are fused by learned attention weights; CASPP = ASPP-style parallel dilated convolutions plus
image-level pooling, fused; a U-Net with skip connections around them. No reference code was found, so the
following choices are this project's:

- HAC block (`HACBlock`): a 3x3 convolution maps the input to the block's width (x0); then K = 3 branches run in a
  *cascade* (hierarchical: branch k convolves branch k-1's output), 3x3 kernels with dilations 1, 2, 3, so the
  receptive fields on x0 grow as 3, 7, 13 pixels. The fusion is Selective-Kernel style attention (Li et al.,
  CVPR 2019): global average pooling of the branch sum -> 1x1 reduction (width / 4, at least 16) -> ReLU -> one
  logit per branch and channel -> softmax over the branches, so the K weights of every channel are positive and
  sum to one. The attention-weighted sum is added to x0 (a residual path that keeps early training stable).
  Every convolution is followed by BatchNorm and ReLU.
- CASPP (`CASPP`): on the bottleneck (stride 16): a 1x1 branch, three 3x3 branches with dilations 2, 4, 6 (the
  DeepLab rates 6 / 12 / 18 are meant for stride-8 maps of 500+ pixel images; at 256 px the bottleneck is 16x16,
  where rate 12 or 18 would mostly read padding) and an image-level branch (global average pooling -> 1x1 ->
  broadcast back), concatenated -> 1x1 fusion -> BatchNorm -> ReLU, plus the input (context *aggregated onto* the
  features rather than replacing them).
- U-Net: widths 32, 64, 128, 256 and a 512-wide bottleneck (four 2x2 max-pool downsamplings, output stride 16);
  the decoder upsamples with 2x2 transposed convolutions, concatenates the skip and applies a HAC block; a 1x1
  convolution gives the mask logits. The classification head (global average pooling -> dropout -> linear) reads
  the CASPP output, as in the other baselines.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .baselines import MultiTaskBaseline, classification_head
from .pretrained import init_pretrained, wants_imagenet
from .registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """kxk convolution ('same' padding for odd k) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class HACBlock(nn.Module):
    """Hierarchical Attention Convolution: cascaded dilated 3x3 branches fused by per-channel softmax attention."""

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (1, 2, 3),
                 reduction: int = 4) -> None:
        super().__init__()
        self.entry = conv_bn_relu(in_channels, out_channels)
        self.branches = nn.ModuleList(conv_bn_relu(out_channels, out_channels, 3, d) for d in dilations)
        hidden = max(16, out_channels // reduction)
        # No BatchNorm after pooling: one value per channel and image would make a batch of one fail in training.
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, hidden, 1),
                                     nn.ReLU(inplace=True))
        self.select = nn.Conv2d(hidden, out_channels * len(dilations), 1)

    def branch_outputs(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """Each branch convolves the previous branch's output: receptive fields 3, 7, 13 for dilations 1, 2, 3."""
        outputs, h = [], x0
        for branch in self.branches:
            h = branch(h)
            outputs.append(h)
        return outputs

    def attention(self, branches: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, K, C, 1, 1) fusion weights: softmax over the K branches, so they sum to one per channel."""
        logits = self.select(self.squeeze(torch.stack(list(branches)).sum(0)))
        b, _, _, _ = logits.shape
        return torch.softmax(logits.view(b, len(branches), -1, 1, 1), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.entry(x)
        branches = self.branch_outputs(x0)
        weights = self.attention(branches)
        fused = (weights * torch.stack(branches, dim=1)).sum(1)
        return x0 + fused


class CASPP(nn.Module):
    """Context Aggregation Spatial Pyramid Pooling: 1x1, dilated 3x3 and image-level branches, fused, residual."""

    def __init__(self, channels: int, dilations: Sequence[int] = (2, 4, 6), branch_channels: Optional[int] = None
                 ) -> None:
        super().__init__()
        width = branch_channels or channels // 4
        self.branches = nn.ModuleList([conv_bn_relu(channels, width, 1)] +
                                      [conv_bn_relu(channels, width, 3, d) for d in dilations])
        # No BatchNorm on the pooled branch: it sees one value per channel and image (batch statistics over B only).
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, width, 1), nn.ReLU(inplace=True))
        self.fuse = conv_bn_relu(width * (len(dilations) + 2), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return x + self.fuse(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class HACEncoder(nn.Module):
    """HAC block at full resolution, then (max-pool, HAC block) per level; CASPP on the deepest level."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        stages = [HACBlock(in_channels, widths[0])]
        stages += [nn.Sequential(nn.MaxPool2d(2), HACBlock(c_in, c_out)) for c_in, c_out in zip(widths, widths[1:])]
        self.stages = nn.ModuleList(stages)
        self.context = CASPP(widths[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        features[-1] = self.context(features[-1])
        return features


class HACUpBlock(nn.Module):
    """2x2 transposed convolution up, concatenate the skip, HAC block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.block = HACBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class HACCASPPUNet(MultiTaskBaseline):
    """U-Net with HAC blocks and a CASPP bottleneck (see the module notes for the design choices)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                 pretrained: Optional[str] = None, widths: Sequence[int] = (32, 64, 128, 256, 512),
                 dropout: float = 0.2, name: str = "hac_caspp_unet") -> None:
        super().__init__()
        wants_imagenet(pretrained, name, available=False)
        widths = list(widths)
        self.size_multiple = 2 ** (len(widths) - 1)
        self.encoder = HACEncoder(in_channels, widths)
        self.decoder = nn.ModuleList(HACUpBlock(c_in, c_out) for c_in, c_out in zip(widths[::-1], widths[-2::-1]))
        self.seg_head = nn.Conv2d(widths[0], 1, 1)
        self.cls_head = classification_head(widths[-1], num_classes, dropout)
        init_pretrained(self, pretrained, name)

    def encoder_stages(self) -> list[nn.Module]:
        return [*self.encoder.stages, self.encoder.context]

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *skips, x = self.encoder(x)
        cls = self.cls_head(x)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        return self.seg_head(x), cls


@register_model("hac_caspp_unet")
def hac_caspp_unet(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                   pretrained: Optional[str] = None, **kwargs) -> HACCASPPUNet:
    """Base U-Net with HAC blocks and a CASPP bottleneck, from scratch (no deep supervision)."""
    return HACCASPPUNet(num_classes, in_channels, deep_supervision, pretrained, **kwargs)
