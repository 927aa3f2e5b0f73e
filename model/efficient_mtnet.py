"""EfficientMTNet: a lightweight multi-task network for tumour classification and segmentation.

    image -> stem (stride 2) -> four inverted-residual stages (strides 4, 8, 16, 32; SE in the deeper ones)
          -> Hamburger (NMF global context) on the stride-32 features
          -> FPN decoder (lateral 1x1, top-down upsample + add, depthwise-separable smoothing) down to stride 4
             (with output_stride=2, one more level from the stem's stride-2 features)
          -> segmentation head, upsampled to the input size
    pooled Hamburger features -> MLP (dropout before the last linear) -> class logits
    training only, with deep supervision: 1x1 auxiliary segmentation heads on the stride-8 and stride-16 levels.

Every setting is a constructor keyword (and so a `model.kwargs` entry of the config). Ablation switches, each
defaulting to the model above: `context` (nmf | breads | attention | none), `se` (SE blocks on/off),
`decoder` (fpn | single) and `output_stride` (4 | 2: the stride of the level the segmentation head reads).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBNAct, DepthwiseSeparableConv, InvertedResidual, make_divisible
from .hamburger import Hamburger
from .pretrained import init_pretrained, wants_imagenet
from .registry import register_model

# One row per encoder stage (strides 4, 8, 16, 32; each stage's first block halves the resolution):
# (expansion ratio, output channels, number of blocks, SE ratio relative to the block input; 0 = no SE).
DEFAULT_STAGES: tuple[tuple[float, int, int, float], ...] = (
    (1, 32, 2, 0.0),
    (4, 48, 2, 0.0),
    (6, 80, 3, 0.25),
    (6, 168, 3, 0.25),
)


def upsample_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of `x` to `size` (the next finer FPN level: 2x per side, or one less).

    Equal to `F.interpolate(x, size, mode="nearest")` (output pixel i reads input i // 2). In eager mode on
    CPU with NCHW tensors it repeats pixels with expand/reshape and crops, which was measured several times
    faster than interpolate's NCHW CPU kernel; traced, exported, compiled or on GPU it calls interpolate.
    """
    b, c, hin, win = x.shape
    h, w = size
    eager_cpu = (x.device.type == "cpu" and x.is_contiguous() and not torch.jit.is_tracing()
                 and not torch.compiler.is_compiling())
    if not (eager_cpu and h in (2 * hin, 2 * hin - 1) and w in (2 * win, 2 * win - 1)):
        return F.interpolate(x, size=(h, w), mode="nearest")
    x = x.unsqueeze(-1).expand(b, c, hin, win, 2).reshape(b, c, hin, 2 * win)
    x = x.unsqueeze(3).expand(b, c, hin, 2, 2 * win).reshape(b, c, 2 * hin, 2 * win)
    return x[:, :, :h, :w]


def _build_stage(in_channels: int, expansion: float, out_channels: int, blocks: int, se_ratio: float) -> nn.Sequential:
    layers = [InvertedResidual(in_channels if i == 0 else out_channels, out_channels, stride=2 if i == 0 else 1,
                               expansion=expansion, se_ratio=se_ratio) for i in range(blocks)]
    return nn.Sequential(*layers)


class SingleScaleDecoder(nn.Module):
    """The ablation baseline of the FPN: one level from the stride-8 encoder map (lateral 1x1 + smoothing).

    Neither the deeper stages nor the global context reach it; returns a one-element list like `FPNDecoder`.
    """

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.lateral = ConvBNAct(in_channels[1], channels, 1, act=None)
        self.smooth = DepthwiseSeparableConv(channels, channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.smooth(self.lateral(features[1]))]


class StemLevel(nn.Module):
    """One more FPN level at stride 2: lateral 1x1 of the stem's features + the stride-4 level upsampled,
    then depthwise-separable smoothing. With 4x fewer logits per side than pixels, a stride-4 head cannot draw
    a small tumour's outline at 128 px (a perfect stride-4 prediction at 128 px scores about 91 % Dice on
    BRISC 2025 masks, a stride-2 one about 96 %)."""

    def __init__(self, stem_channels: int, channels: int) -> None:
        super().__init__()
        self.lateral = ConvBNAct(stem_channels, channels, 1, act=None)
        self.smooth = DepthwiseSeparableConv(channels, channels)

    def forward(self, stem: torch.Tensor, stride4: torch.Tensor) -> torch.Tensor:
        lateral = self.lateral(stem)
        return self.smooth(lateral + upsample_nearest(stride4, lateral.shape[-2:]))


# `context` choices -> the Hamburger's ham ("none": no global-context module at all).
CONTEXTS = {"nmf": "nmf", "breads": "none", "attention": "attention", "none": None}
DECODERS = ("fpn", "single")
OUTPUT_STRIDES = (4, 2)


class FPNDecoder(nn.Module):
    """Top-down feature pyramid: level_i = smooth_i(lateral_i(c_i) + upsample(level_{i+1})).

    The smoothing sits on the main path, so every level the auxiliary heads read is also used at inference.
    Upsampling goes to the exact size of the finer level, so any input size works.
    """

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(ConvBNAct(c, channels, 1, act=None) for c in in_channels)
        # no smoothing on the coarsest level: it is the (already context-mixed) Hamburger output
        self.smooth = nn.ModuleList(DepthwiseSeparableConv(channels, channels) for _ in in_channels[:-1])

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """features: encoder maps finest first; returns decoder levels finest first."""
        top = self.laterals[-1](features[-1])
        levels = [top]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.laterals[i](features[i])
            top = self.smooth[i](lateral + upsample_nearest(top, lateral.shape[-2:]))
            levels.append(top)
        return levels[::-1]


@register_model("efficient_mtnet")
class EfficientMTNet(nn.Module):
    """Multi-task network: `forward(x)` -> {"cls": (B, num_classes), "seg": (B, 1, H, W), ["aux": [...]]}.

    Args:
        num_classes: classification outputs.
        in_channels: image channels (1 or 3).
        deep_supervision: create auxiliary segmentation heads, returned as `aux` in training mode only.
        width_mult: scales every channel count (encoder, Hamburger, decoder, heads), rounded to multiples of 8.
        dropout: dropout before the last classification layer.
        stem_channels: output channels of the stride-2 stem convolution.
        stages: four rows (expansion, channels, blocks, se_ratio), strides 4, 8, 16, 32.
        ham_channels, ham_rank, ham_train_steps, ham_eval_steps, ham_inv_t: the Hamburger's NMF settings.
        decoder_channels: FPN width.
        cls_hidden: hidden width of the classification MLP.
        pretrained: a local weights file for the encoder (a state_dict of `model.encoder`, or a whole-model
            checkpoint of this architecture, e.g. a previous run's best.pth); no ImageNet weights exist.
        context: the global-context module on the stride-32 features: "nmf" (the Hamburger), "breads" (its two
            1x1 projections, residual, without the decomposition), "attention" (the breads around softmax
            self-attention of the same width, `attn_heads` heads: a non-local block) or "none" (identity).
        attn_heads: heads of the attention context (must divide the Hamburger width).
        se: Squeeze-and-Excitation in the stages that have it (False sets every stage's SE ratio to 0).
        decoder: "fpn" (the top-down pyramid fused at stride 4) or "single" (one level from the stride-8 encoder
            map, `SingleScaleDecoder`); "single" has no deeper levels, hence no auxiliary heads.
        output_stride: 4 (the segmentation head reads the FPN's stride-4 level) or 2 (it reads one more level,
            `StemLevel`, fused from the stem's stride-2 features; "fpn" only). The auxiliary heads stay on the
            stride-8 and stride-16 levels.
    """

    def __init__(self, num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                 width_mult: float = 1.0, dropout: float = 0.2, stem_channels: int = 16,
                 stages: Sequence[Sequence[float]] = DEFAULT_STAGES, ham_channels: int = 64, ham_rank: int = 16,
                 ham_train_steps: int = 6, ham_eval_steps: int = 7, ham_inv_t: float = 1.0,
                 decoder_channels: int = 48, cls_hidden: int = 128, pretrained: Optional[str] = None,
                 context: str = "nmf", attn_heads: int = 1, se: bool = True, decoder: str = "fpn",
                 output_stride: int = 4) -> None:
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"EfficientMTNet 'context' must be one of {', '.join(CONTEXTS)}; got {context!r}")
        if decoder not in DECODERS:
            raise ValueError(f"EfficientMTNet 'decoder' must be one of {', '.join(DECODERS)}; got {decoder!r}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"EfficientMTNet 'output_stride' must be one of {OUTPUT_STRIDES}; got {output_stride!r}")
        if output_stride == 2 and decoder != "fpn":
            raise ValueError("EfficientMTNet 'output_stride' 2 needs decoder='fpn' (the stride-2 level extends the "
                             "pyramid)")
        if len(stages) != 4 or any(len(row) != 4 for row in stages):
            raise ValueError("EfficientMTNet 'stages' needs four rows (expansion, channels, blocks, se_ratio) for "
                             f"strides 4, 8, 16, 32; got {stages!r}")
        if width_mult <= 0:
            raise ValueError(f"EfficientMTNet 'width_mult' must be > 0, got {width_mult}")

        def width(channels: float) -> int:
            return make_divisible(channels * width_mult)

        self.num_classes = num_classes
        self.deep_supervision = deep_supervision and decoder == "fpn"  # a single level has no deeper ones
        if not se:
            stages = [(*row[:3], 0.0) for row in stages]

        stem_out = width(stem_channels)
        encoder: dict[str, nn.Module] = {"stem": ConvBNAct(in_channels, stem_out, 3, stride=2)}
        channels, previous = [], stem_out
        for index, (expansion, out_channels, blocks, se_ratio) in enumerate(stages, start=1):
            if int(blocks) < 1:
                raise ValueError(f"EfficientMTNet stage {index} needs at least one block, got {blocks}")
            out = width(out_channels)
            encoder[f"stage{index}"] = _build_stage(previous, float(expansion), out, int(blocks), float(se_ratio))
            channels.append(out)
            previous = out
        self.encoder = nn.ModuleDict(encoder)

        ham = CONTEXTS[context]
        self.context = nn.Identity() if ham is None else Hamburger(
            channels[-1], width(ham_channels), ham_rank, ham_train_steps, ham_eval_steps, ham_inv_t, ham=ham,
            heads=attn_heads)
        dec = width(decoder_channels)
        self.decoder = FPNDecoder(channels, dec) if decoder == "fpn" else SingleScaleDecoder(channels, dec)
        self.seg_head = nn.Conv2d(dec, 1, 1)  # on the finest decoder level (stride 4 or 2; "single": stride 8)
        # auxiliary heads on the stride-8 and stride-16 decoder levels (in the order of `aux`)
        self.aux_heads = nn.ModuleList(nn.Conv2d(dec, 1, 1) for _ in range(2)) if self.deep_supervision else None
        hidden = width(cls_hidden)
        self.cls_head = nn.Sequential(nn.Linear(channels[-1], hidden), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden, num_classes))
        # created last, and only when asked for: the default model's initialisation is unchanged
        self.stem_level = StemLevel(stem_out, dec) if output_stride == 2 else None
        self._init_weights()
        wants_imagenet(pretrained, "efficient_mtnet", available=False)  # validates the value before loading
        init_pretrained(self, pretrained, "efficient_mtnet")

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # Logit convs keep PyTorch's fan-in initialisation: fan-out init of a 1-channel head gives logits of
        # std ~10 (initial BCE ~4), while a much smaller init was measured to slow the growth of the logit scale.
        for head in [self.seg_head, *(self.aux_heads or [])]:
            head.reset_parameters()

    def encoder_stages(self) -> list[nn.Module]:
        """Encoder stages in order, stem first (used for freezing and as the Grad-CAM target)."""
        return list(self.encoder.values())

    def forward(self, x: torch.Tensor) -> dict:
        features = []
        stem = out = self.encoder["stem"](x)
        for name, stage in self.encoder.items():
            if name != "stem":
                out = stage(out)
                features.append(out)
        features[-1] = self.context(features[-1])
        levels = self.decoder(features)
        finest = levels[0] if self.stem_level is None else self.stem_level(stem, levels[0])
        seg = F.interpolate(self.seg_head(finest), size=x.shape[-2:], mode="bilinear", align_corners=False)
        pooled = features[-1].mean((2, 3))
        outputs = {"cls": self.cls_head(pooled), "seg": seg}
        if self.training and self.aux_heads is not None:
            outputs["aux"] = [head(level) for head, level in zip(self.aux_heads, levels[1:3])]
        return outputs
