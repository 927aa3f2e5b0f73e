"""How an image of any size is mapped onto the model's square input, and how predictions go back.

Every path that predicts at the model's size and scores or saves at the image's own size (native-resolution
scoring in test.py, folder prediction, the figures) goes through `logits_to_original`, so the geometry is
defined once: resize the logits bilinearly back to the original (height, width), then threshold.

Two ways onto the square (`data.resize`):
- `stretch`: the image is resized to (size, size), changing its aspect ratio when it is not square;
- `letterbox`: the longest side is scaled to `size` and the other side centred and zero-padded; the box the
  image occupies (`letterbox_box`) is the same when decoding (datasets/decode.py) and when mapping back,
  which crops the box and resizes only that, so the padding never leaks into the original frame.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

RESIZE_MODES = ("stretch", "letterbox")


def letterbox_box(original_hw: Sequence[int], size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of `original_hw` inside its (size, size) letterbox: the longest
    side scaled to `size`, the other rounded (at least 1 pixel) and centred (an odd margin puts the extra
    pixel at the bottom/right)."""
    height, width = int(original_hw[0]), int(original_hw[1])
    scale = size / max(height, width)
    inner_h, inner_w = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
    return (size - inner_h) // 2, (size - inner_w) // 2, inner_h, inner_w


def logits_to_original(logits: torch.Tensor, original_hw: Sequence[int], resize_mode: str = "stretch"
                       ) -> torch.Tensor:
    """Segmentation logits at the model's size, (N, 1, s, s), back onto the original (height, width).

    Logits (not thresholded masks) are interpolated bilinearly, then a caller thresholds them: resampling a
    binary mask with nearest neighbour would make staircase edges at every upscaling. With `letterbox` the
    padding is cropped away first (exact when the image's longest side equals the model size).
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{resize_mode}'; expected one of {', '.join(RESIZE_MODES)}")
    height, width = int(original_hw[0]), int(original_hw[1])
    if resize_mode == "letterbox":
        top, left, inner_h, inner_w = letterbox_box((height, width), logits.shape[-1])
        logits = logits[..., top:top + inner_h, left:left + inner_w]
    if tuple(logits.shape[-2:]) == (height, width):
        return logits
    return F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
