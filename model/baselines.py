"""Comparison models for the benchmark table, each honouring the project's output contract.

Registered names: `unet`, `light_unet`, `resnet_unet`, `mobilenetv2_unet`, `efficientnet_b0_unet`, `segformer`,
`vit` (SegNeXt-T lives in `model/segnext.py`). Every model

- takes `num_classes`, `in_channels`, `deep_supervision` and `pretrained` keyword arguments. The comparison models
  have no deep supervision: the flag is accepted so that all models share one constructor signature, and their
  output never has an `aux` key;
- returns `{"cls": (B, num_classes) logits, "seg": (B, 1, H, W) logits}` for any input size: the input is padded
  to a multiple of the network's output stride and the mask cropped back (`pad_to_multiple`);
- exposes `encoder` (the pretrainable part) and `encoder_stages()` (stem first; the last entry is a module that
  runs in the forward pass and yields the deepest feature map, the default Grad-CAM target).

Weights are random by default. `pretrained="path/to/encoder.pth"` loads a local state_dict into `model.encoder`
(`load_encoder_weights`); `pretrained="imagenet"` downloads the libraries' ImageNet weights and fails fast with a
clear message when the download host cannot be reached (`require_hub`).
"""
from __future__ import annotations

import abc
import contextlib
from typing import Optional, Sequence

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .pretrained import IMAGENET, hub_download, init_pretrained, wants_imagenet
from .registry import register_model


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right of `x` so that height and width are multiples of `multiple`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


class MultiTaskBaseline(nn.Module, abc.ABC):
    """Shared forward pass: pad to `size_multiple`, run `predict`, bring the mask back to the input size."""

    size_multiple: int = 32
    encoder: nn.Module

    @abc.abstractmethod
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(segmentation logits at any resolution, classification logits) for a padded input."""

    @abc.abstractmethod
    def encoder_stages(self) -> list[nn.Module]:
        """Encoder stages in execution order, stem first."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.size_multiple)
        seg, cls = self.predict(padded)
        if seg.shape[-2:] != padded.shape[-2:]:
            seg = F.interpolate(seg, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        if padded.shape[-2:] != (h, w):
            seg = seg[..., :h, :w]
        return {"cls": cls, "seg": seg}


def classification_head(in_features: int, num_classes: int, dropout: float = 0.2) -> nn.Sequential:
    """Global average pooling -> dropout -> linear, on a (B, C, h, w) feature map."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(dropout),
                         nn.Linear(in_features, num_classes))


# --------------------------------------------------------------------------------------------- plain U-Nets
class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    """Contracting path: a double conv at full resolution, then (max-pool, double conv) per level."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        stages = [DoubleConv(in_channels, widths[0])]
        stages += [nn.Sequential(nn.MaxPool2d(2), DoubleConv(c_in, c_out)) for c_in, c_out in zip(widths, widths[1:])]
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UpBlock(nn.Module):
    """2x2 transposed conv up, concatenate the skip, double conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(MultiTaskBaseline):
    """U-Net (Ronneberger et al., 2015) with BatchNorm and a classification head on the bottleneck.

    `widths` lists the filters of each level, the last one being the bottleneck: the classic network is
    (64, 128, 256, 512, 1024), four down/up levels.
    """

    def __init__(self, num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                 pretrained: Optional[str] = None, widths: Sequence[int] = (64, 128, 256, 512, 1024),
                 dropout: float = 0.2, name: str = "unet") -> None:
        super().__init__()
        wants_imagenet(pretrained, name, available=False)
        widths = list(widths)
        self.size_multiple = 2 ** (len(widths) - 1)
        self.encoder = UNetEncoder(in_channels, widths)
        self.decoder = nn.ModuleList(UpBlock(c_in, c_out) for c_in, c_out in zip(widths[::-1], widths[-2::-1]))
        self.seg_head = nn.Conv2d(widths[0], 1, 1)
        self.cls_head = classification_head(widths[-1], num_classes, dropout)
        init_pretrained(self, pretrained, name)

    def encoder_stages(self) -> list[nn.Module]:
        return list(self.encoder.stages)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *skips, x = self.encoder(x)
        cls = self.cls_head(x)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        return self.seg_head(x), cls


@register_model("unet")
def unet(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
         pretrained: Optional[str] = None, **kwargs) -> UNet:
    """Classic U-Net: four down/up levels, 64 base filters (about 31 M parameters)."""
    return UNet(num_classes, in_channels, deep_supervision, pretrained, name="unet", **kwargs)


@register_model("light_unet")
def light_unet(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
               pretrained: Optional[str] = None, **kwargs) -> UNet:
    """The small multi-task U-Net: three levels of 32, 64 and 128 filters and a 256-filter bottleneck."""
    kwargs.setdefault("widths", (32, 64, 128, 256))
    return UNet(num_classes, in_channels, deep_supervision, pretrained, name="light_unet", **kwargs)


# --------------------------------------------------------------------------------------------- smp models
class SmpMultiTask(MultiTaskBaseline):
    """A segmentation_models_pytorch model (encoder, decoder, heads) with its classification head as `cls`.

    The parts of the smp model are adopted as direct children, so the state_dict reads `encoder.*`,
    `decoder.*`, `segmentation_head.*` and `classification_head.*`.
    """

    def __init__(self, net: smp.base.SegmentationModel) -> None:
        super().__init__()
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.segmentation_head = net.segmentation_head
        self.classification_head = net.classification_head
        self.size_multiple = net.encoder.output_stride

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        seg = self.segmentation_head(self.decoder(features))
        return seg, self.classification_head(features[-1])

    def encoder_stages(self) -> list[nn.Module]:
        return self.stages_of(self.encoder)

    @staticmethod
    def stages_of(encoder: nn.Module) -> list[nn.Module]:
        """Stages of the encoders used here; groups that are not one module are wrapped in a Sequential."""
        if isinstance(encoder, smp.encoders.resnet.ResNetEncoder):
            return [nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu),
                    encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]
        if isinstance(encoder, smp.encoders.mobilenet.MobileNetV2Encoder):
            f = encoder.features  # grouped by output stride 2, 4, 8, 16, 32; then the final 1x1 conv
            return [f[0:2], f[2:4], f[4:7], f[7:14], f[14:18], f[18]]
        if isinstance(encoder, smp.encoders.mix_transformer.MixVisionTransformerEncoder):
            return [getattr(encoder, f"{part}{i}") for i in range(1, 5) for part in ("patch_embed", "block", "norm")]
        if isinstance(encoder, smp.encoders.TimmUniversalEncoder):  # timm EfficientNet: stem, then its 7 stages
            net = encoder.model
            return [nn.Sequential(net.conv_stem, net.bn1), *net.blocks]
        raise TypeError(f"no stage list known for encoder {type(encoder).__name__}")


def _smp_model(architecture: type, encoder_name: str, model_name: str, num_classes: int, in_channels: int,
               pretrained: Optional[str], dropout: float = 0.2, **arch_kwargs) -> SmpMultiTask:
    hub = wants_imagenet(pretrained, model_name)
    weights: object = None
    if hub:  # timm-backed (`tu-`) encoders take True, smp's own ones a weights name
        weights = True if encoder_name.startswith("tu-") else IMAGENET
    with hub_download(model_name) if hub else contextlib.nullcontext():
        net = architecture(encoder_name=encoder_name, encoder_weights=weights, in_channels=in_channels, classes=1,
                           aux_params={"classes": num_classes, "dropout": dropout}, **arch_kwargs)
    model = SmpMultiTask(net)
    init_pretrained(model, pretrained, model_name)
    return model


@register_model("resnet_unet")
def resnet_unet(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                pretrained: Optional[str] = None, **kwargs) -> SmpMultiTask:
    """U-Net decoder (smp) on a ResNet-34 encoder."""
    return _smp_model(smp.Unet, "resnet34", "resnet_unet", num_classes, in_channels, pretrained, **kwargs)


@register_model("mobilenetv2_unet")
def mobilenetv2_unet(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                     pretrained: Optional[str] = None, **kwargs) -> SmpMultiTask:
    """U-Net decoder (smp) on a MobileNetV2 encoder."""
    return _smp_model(smp.Unet, "mobilenet_v2", "mobilenetv2_unet", num_classes, in_channels, pretrained, **kwargs)


@register_model("efficientnet_b0_unet")
def efficientnet_b0_unet(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                         pretrained: Optional[str] = None, **kwargs) -> SmpMultiTask:
    """U-Net decoder (smp) on timm's EfficientNet-B0 encoder."""
    return _smp_model(smp.Unet, "tu-efficientnet_b0", "efficientnet_b0_unet", num_classes, in_channels, pretrained,
                      **kwargs)


@register_model("segformer")
def segformer(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
              pretrained: Optional[str] = None, **kwargs) -> SmpMultiTask:
    """SegFormer-B0: MiT-B0 encoder and the all-MLP decoder (256 channels), both from smp."""
    kwargs.setdefault("decoder_segmentation_channels", 256)
    return _smp_model(smp.Segformer, "mit_b0", "segformer", num_classes, in_channels, pretrained, **kwargs)


# --------------------------------------------------------------------------------------------- ViT
class ViTSetr(MultiTaskBaseline):
    """A timm Vision Transformer with a SETR-naive segmentation decoder and the class-token classifier.

    SETR-naive: the final patch tokens form a (h/16, w/16) grid -> 1x1 conv + BN + ReLU -> 1x1 conv to the mask
    logits -> bilinear upsampling. Position embeddings are interpolated for any grid (`dynamic_img_size`).
    """

    def __init__(self, num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
                 pretrained: Optional[str] = None, variant: str = "vit_base_patch16_224",
                 decoder_channels: int = 256, dropout: float = 0.1, name: str = "vit") -> None:
        super().__init__()
        hub = wants_imagenet(pretrained, name)
        with hub_download(name) if hub else contextlib.nullcontext():
            self.encoder = timm.create_model(variant, pretrained=hub, num_classes=0, in_chans=in_channels,
                                             dynamic_img_size=True)
        self.size_multiple = self.encoder.patch_embed.patch_size[0]
        dim = self.encoder.embed_dim
        self.decoder = nn.Sequential(nn.Conv2d(dim, decoder_channels, 1, bias=False),
                                     nn.BatchNorm2d(decoder_channels), nn.ReLU(inplace=True))
        self.seg_head = nn.Conv2d(decoder_channels, 1, 1)
        self.cls_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        init_pretrained(self, pretrained, name)

    def encoder_stages(self) -> list[nn.Module]:
        # Token outputs (B, N, C): Grad-CAM on a ViT needs a reshape transform of these activations.
        return [self.encoder.patch_embed, *self.encoder.blocks]

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder.forward_features(x)  # (B, prefix + h*w, C), final norm applied
        patches = tokens[:, self.encoder.num_prefix_tokens:]
        grid_h, grid_w = x.shape[-2] // self.size_multiple, x.shape[-1] // self.size_multiple
        grid = patches.transpose(1, 2).reshape(x.shape[0], -1, grid_h, grid_w)
        return self.seg_head(self.decoder(grid)), self.cls_head(tokens[:, 0])


@register_model("vit")
def vit(num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True,
        pretrained: Optional[str] = None, **kwargs) -> ViTSetr:
    """ViT-B/16 (timm) with a SETR-naive decoder and the class-token head (about 86 M parameters)."""
    return ViTSetr(num_classes, in_channels, deep_supervision, pretrained, name="vit", **kwargs)
