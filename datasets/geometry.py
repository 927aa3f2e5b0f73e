"""How an image of any size is mapped onto the model's square input, and how predictions go back.

Every path that predicts at the model's size and scores or saves at the image's own size (native-resolution
scoring in test.py, folder prediction, the figures) goes through `logits_to_original`, so the geometry is
defined once: resize the logits bilinearly back to the original (height, width), then threshold.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

RESIZE_MODES = ("stretch",)


def logits_to_original(logits: torch.Tensor, original_hw: Sequence[int], resize_mode: str = "stretch"
                       ) -> torch.Tensor:
    """Segmentation logits at the model's size, (N, 1, s, s), back onto the original (height, width).

    Logits (not thresholded masks) are interpolated bilinearly, then a caller thresholds them: resampling a
    binary mask with nearest neighbour would make staircase edges at every upscaling.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{resize_mode}'; expected one of {', '.join(RESIZE_MODES)}")
    height, width = int(original_hw[0]), int(original_hw[1])
    if tuple(logits.shape[-2:]) == (height, width):
        return logits
    return F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
