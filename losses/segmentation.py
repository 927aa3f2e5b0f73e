"""Binary segmentation loss terms (BCE, soft Dice, Focal, Tversky) and their configurable weighted sum.

Every term is computed in float32 from logits and returns one value per image (or, for the overlap terms in
batch mode, one value for the batch), so that images without an annotation can be left out with a 0/1 weight
instead of boolean indexing: no host synchronisation, and exactly zero (still differentiable) when a batch
holds no annotated image.

Conventions
-----------
- BCE and Focal: mean over the pixels of an image, then mean over the annotated images of the batch. Their
  minimum is 0 (a confident, correct prediction).
- Soft Dice: ``1 - (2*TP + s) / (2*TP + FP + FN + s)`` and Tversky: ``1 - (TP + s) / (TP + a*FP + b*FN + s)``
  with soft counts TP = sum(p*g), FP = sum(p*(1-g)), FN = sum((1-p)*g), p = sigmoid(logit), g the mask and
  s the smoothing constant (> 0). Dice is the Tversky index with a = b = 0.5 and smoothing s / 2.
- Per image (``dice_per_image=True``, the default): the ratio is taken for every image and averaged over the
  annotated images. On an image with an empty mask (no tumour) Dice is ``1 - s / (sum(p) + s)`` (Tversky
  ``1 - s / (a*sum(p) + s)``): about 0 when nothing is predicted and rising towards 1 with the predicted tumour
  area, so false positives on no-tumour images are penalised, bounded, and never NaN. The smoothing sets the
  scale: with s = 1, one confidently predicted pixel already costs 0.5 Dice.
- Per batch (``dice_per_image=False``): the soft counts are summed over all annotated images first, so
  empty images only add their false positives to the batch's denominator (and a batch whose masks are all
  empty behaves like one empty image above).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.config import SEG_TERMS, SegLossConfig, check_seg_loss

TERM_NAMES = SEG_TERMS  # the segmentation terms, in the order they are logged


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of per-image `values` over images whose `weight` is 1; exactly 0 when every weight is 0."""
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def bce_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the pixels of each image: (B, 1, H, W) -> (B,)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def focal_per_image(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., 2017) averaged over the pixels of each image: (B, 1, H, W) -> (B,).

    `alpha` weighs tumour pixels and ``1 - alpha`` background pixels; `gamma` down-weights easy pixels.
    """
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_true).pow(gamma) * ce).flatten(1).mean(1)


def soft_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft true-positive, false-positive and false-negative pixel counts per image, each (B,)."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    tp = (prob * target).sum(1)
    fp = (prob * (1 - target)).sum(1)
    fn = ((1 - prob) * target).sum(1)
    return tp, fp, fn


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, alpha: float, beta: float,
                 smooth: float, per_image: bool = True) -> torch.Tensor:
    """``1 - (TP + s) / (TP + alpha*FP + beta*FN + s)`` over the images whose `weight` is 1 (see module notes)."""
    tp, fp, fn = soft_counts(logits, target)
    if not per_image:
        tp, fp, fn = (tp * weight).sum(), (fp * weight).sum(), (fn * weight).sum()
    loss = 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return masked_mean(loss, weight) if per_image else loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, smooth: float,
              per_image: bool = True) -> torch.Tensor:
    """Soft Dice loss ``1 - (2*TP + s) / (2*TP + FP + FN + s)`` over the images whose `weight` is 1."""
    return tversky_loss(logits, target, weight, 0.5, 0.5, smooth / 2, per_image)


class SegmentationLoss(nn.Module):
    """Weighted sum of the segmentation terms whose weight in `SegLossConfig` is positive.

    ``forward(logits, target, weight)`` takes logits and masks of the same (B, 1, H, W) size and a float 0/1
    weight per image (0 for images without an annotation) and returns ``(combined, {term: value})`` with the
    unweighted value of each active term; both keep their graph.
    """

    def __init__(self, cfg: SegLossConfig) -> None:
        super().__init__()
        check_seg_loss(cfg)  # ConfigError (a ValueError) naming the key
        self.cfg = cfg
        self.weights = {name: float(getattr(cfg, name)) for name in TERM_NAMES if getattr(cfg, name) > 0}

    @property
    def active_terms(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if "bce" in self.weights:
            terms["bce"] = masked_mean(bce_per_image(logits, target), weight)
        if "dice" in self.weights:
            terms["dice"] = dice_loss(logits, target, weight, cfg.smooth, cfg.dice_per_image)
        if "focal" in self.weights:
            terms["focal"] = masked_mean(focal_per_image(logits, target, cfg.focal_alpha, cfg.focal_gamma), weight)
        if "tversky" in self.weights:
            terms["tversky"] = tversky_loss(logits, target, weight, cfg.tversky_alpha, cfg.tversky_beta,
                                            cfg.smooth, cfg.dice_per_image)
        combined = sum(self.weights[name] * value for name, value in terms.items())
        return combined, terms
