"""The multi-task training loss: classification cross-entropy + segmentation terms + deep supervision.

    total = cls_weight * cls + seg_weight * seg + sum_i aux_weights[i] * aux_i

- ``cls``: cross-entropy on ``outputs["cls"]`` with optional label smoothing and class weights (torch's
  convention: with weights, the mean is ``sum(w_y * loss) / sum(w_y)``).
- ``seg``: the weighted sum of the active segmentation terms (see `losses.segmentation`) on ``outputs["seg"]``;
  each active term is also reported as ``seg_<term>`` (unweighted).
  A classification-only model (no ``seg`` in its output) needs ``seg_weight = 0`` and no positive aux weight:
  otherwise the loss raises a ``ConfigError`` naming those keys.
- ``aux_i``: the same weighted sum on the i-th deep-supervision output. Auxiliary logits are *upsampled*
  (bilinear) to the mask size rather than the mask being downsampled: a downsampled binary mask is either
  aliased (nearest: small or thin tumours vanish at stride 16-32) or no longer binary (area averaging: BCE and
  Dice lose their exact minimum), while upsampled logits are scored against the exact full-resolution mask,
  the same target as the main output. A model that returns more auxiliary outputs than ``aux_weights`` has
  weights is an error (no weight is guessed); extra weights are unused; a zero weight skips that output.

Images with ``has_mask=False`` get weight 0 in every segmentation term (main and auxiliary): they change
nothing, and a batch without any annotated image gives segmentation terms of exactly 0 that still
back-propagate (zeros). All terms are computed in float32 with autocast off, whatever the outputs' dtype.

``forward(outputs, batch)`` returns ``(total, terms)``: ``total`` keeps its graph; ``terms`` maps every active
term name (``cls``, ``seg``, ``seg_bce``, ``seg_dice``, ``seg_focal``, ``seg_tversky``, ``aux_0``, ...,
``total``) to a detached scalar, for logging.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses.segmentation import SegmentationLoss
from utils.config import ConfigError, LossConfig, check_loss


def balanced_class_weights(class_counts: Sequence[int]) -> list[float]:
    """Inverse-frequency weights ``N / (K * n_k)`` (scikit-learn's "balanced"): 1 for every class when balanced."""
    counts = [int(c) for c in class_counts]
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"loss.class_weights='balanced' needs a positive training count for every class, got "
                         f"{counts}; give explicit weights in loss.class_weights instead")
    total = sum(counts)
    return [total / (len(counts) * c) for c in counts]


class MultiTaskLoss(nn.Module):
    """Classification + segmentation + deep-supervision loss configured by `LossConfig` (see module notes).

    `class_counts` (training images per class, in label order) is needed when ``cfg.class_weights`` is
    ``"balanced"``; a list in the config is used as given.
    """

    def __init__(self, cfg: LossConfig, class_counts: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        check_loss(cfg)  # ConfigError (a ValueError) naming the key
        self.cls_weight = float(cfg.cls_weight)
        self.seg_weight = float(cfg.seg_weight)
        self.aux_weights = [float(w) for w in cfg.aux_weights]
        self.label_smoothing = float(cfg.label_smoothing)

        weights = self._class_weights(cfg, class_counts)
        # Not persistent: it is derived from the config and the data, not learnt.
        self.register_buffer("class_weight", weights, persistent=False)

        uses_seg = self.seg_weight > 0 or any(w > 0 for w in self.aux_weights)
        self.seg_loss = SegmentationLoss(cfg.seg) if uses_seg else None

    @staticmethod
    def _class_weights(cfg: LossConfig, class_counts: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
        if cfg.class_weights is None:
            return None
        if cfg.class_weights == "balanced":
            if class_counts is None:
                raise ValueError("loss.class_weights='balanced' needs the training class counts: pass "
                                 "class_counts to MultiTaskLoss, or give explicit weights in the config")
            return torch.tensor(balanced_class_weights(class_counts), dtype=torch.float32)
        if isinstance(cfg.class_weights, (list, tuple)):
            values = [float(w) for w in cfg.class_weights]
            if any(w < 0 for w in values) or not any(w > 0 for w in values):
                raise ValueError(f"config key 'loss.class_weights': got {values}; expected non-negative weights, "
                                 "at least one positive")
            return torch.tensor(values, dtype=torch.float32)
        raise ValueError(f"config key 'loss.class_weights': got {cfg.class_weights!r}; allowed: null, 'balanced' "
                         "or a list with one weight per class")

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = (outputs["cls"] if "cls" in outputs else outputs["seg"]).device
        with torch.autocast(device_type=device.type, enabled=False):
            terms, weighted = self._terms(outputs, batch)
        total = torch.stack(weighted).sum()
        logged = {name: value.detach() for name, value in terms.items()}
        logged["total"] = total.detach()
        return total, logged

    def _terms(self, outputs: dict, batch: dict) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        terms: dict[str, torch.Tensor] = {}
        weighted: list[torch.Tensor] = []
        if self.cls_weight > 0:
            if "cls" not in outputs:
                raise ConfigError("the model has no classification output (a segmentation-only model) but the loss "
                                  "scores one: set loss.cls_weight=0")
            terms["cls"] = self.classification(outputs["cls"], batch["label"])
            weighted.append(self.cls_weight * terms["cls"])
        if self.seg_loss is None:
            return terms, weighted
        if "seg" not in outputs:
            raise ConfigError("the model has no segmentation output (a classification-only model) but the loss "
                              "scores one: set loss.seg_weight=0 and loss.aux_weights=[]")

        target, image_weight = _segmentation_target(batch)
        if self.seg_weight > 0:
            seg, parts = self.seg_loss(_resize_logits(outputs["seg"], target), target, image_weight)
            terms["seg"] = seg
            terms.update({f"seg_{name}": value for name, value in parts.items()})
            weighted.append(self.seg_weight * seg)

        aux = outputs.get("aux") or []
        if len(aux) > len(self.aux_weights):
            raise ValueError(f"the model returned {len(aux)} auxiliary segmentation outputs but loss.aux_weights "
                             f"has {len(self.aux_weights)} weights ({self.aux_weights}); give one weight per output "
                             "(0 switches one off) or turn model.deep_supervision off")
        for index, (logits, aux_weight) in enumerate(zip(aux, self.aux_weights)):
            if aux_weight <= 0:
                continue
            value, _ = self.seg_loss(_resize_logits(logits, target), target, image_weight)
            terms[f"aux_{index}"] = value
            weighted.append(aux_weight * value)
        return terms, weighted

    def classification(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the configured label smoothing and class weights, in float32."""
        weight = self.class_weight
        if weight is not None:
            if weight.numel() != logits.shape[1]:
                raise ValueError(f"loss.class_weights has {weight.numel()} weights but the model predicts "
                                 f"{logits.shape[1]} classes; give one weight per class")
            weight = weight.to(logits.device)
        return F.cross_entropy(logits.float(), labels.long(), weight=weight, label_smoothing=self.label_smoothing)


def _segmentation_target(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 mask (zeroed where there is no annotation) and the float 0/1 weight of each image."""
    mask = batch["mask"]
    if mask.dim() != 4:
        raise ValueError(f"batch['mask'] must be (B, 1, H, W), got shape {tuple(mask.shape)}")
    mask = mask.float()
    has_mask = batch.get("has_mask")
    if has_mask is None:
        return mask, torch.ones(mask.shape[0], device=mask.device)
    has_mask = has_mask.to(device=mask.device, dtype=torch.bool)
    # torch.where rather than a product: an unused mask never leaks into the loss, whatever it holds.
    mask = torch.where(has_mask.view(-1, 1, 1, 1), mask, torch.zeros((), device=mask.device))
    return mask, has_mask.float()


def _resize_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Float32 logits at the mask's size (bilinear upsampling for lower-resolution auxiliary outputs)."""
    logits = logits.float()
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return logits
