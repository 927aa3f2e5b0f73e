"""How an image of any size is mapped onto the model's square input, and how predictions go back.

Every path that predicts at the model's size and scores or saves at the image's own size (native-resolution
scoring in test.py, folder prediction, the figures) goes through `logits_to_original`, so the geometry is
defined once: resize the logits bilinearly back to the original (height, width), then threshold.

Three ways onto the square (`data.preprocess.resize`):
- `stretch`: the image is resized to (size, size), changing its aspect ratio when it is not square;
- `letterbox`: the longest side is scaled to `size` and the other side centred and zero-padded; the box the
  image occupies (`letterbox_box`) is the same when decoding (datasets/decode.py) and when mapping back,
  which crops the box and resizes only that, so the padding never leaks into the original frame;
- `head`: the head is found (`find_head`), its bounding box grown by `data.preprocess.head_margin` of its longer side
  on every side and made square around its centre; that square (in original pixels, zero outside the image)
  is resized to `size`. The file's canvas (aspect ratio, padding, where the head sits) no longer reaches the
  model. An image without a findable head falls back to `letterbox` (`Placement.fallback`).

The placement of one image is a `Placement` (`place(grey, size, mode, margin)`): stretch and letterbox need
only the image's size, head needs its pixels. `logits_to_original` takes a `Placement` (any mode) or, for
stretch and letterbox, the mode's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

RESIZE_MODES = ("stretch", "letterbox", "head")
HEAD_VERSION = 1  # bump when find_head changes: part of the cache key
# Foreground threshold: half of Otsu's threshold on the lightly blurred grey image. Otsu alone separates the
# background from the *bright* tissue; dim tissue (CSF, T2 grey matter) sits between, so half of it keeps the
# whole head while staying well above the background's noise and JPEG ringing (a few grey levels).
HEAD_OTSU_FRACTION = 0.5
HEAD_MIN_AREA = 0.02  # a largest component below this share of the image is not a head: fall back
DEFAULT_HEAD_MARGIN = 0.05  # data.preprocess.head_margin's default
BACKGROUND_LOGIT = -1e4  # outside a head crop nothing was predicted: background (fits fp16)


@dataclass(frozen=True)
class Placement:
    """Where one image sits on the model's (size, size) input.

    `mode` is the mode actually used (letterbox when head was asked for and not found: `fallback` True);
    `box` (head only) is (top, left, side): the square of the original image, in its pixels, that fills the
    input; it may reach beyond the image, where the input is zero."""

    mode: str
    original_hw: tuple[int, int]
    size: int
    box: Optional[tuple[int, int, int]] = None
    fallback: bool = False


def letterbox_box(original_hw: Sequence[int], size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of `original_hw` inside its (size, size) letterbox: the longest
    side scaled to `size`, the other rounded (at least 1 pixel) and centred (an odd margin puts the extra
    pixel at the bottom/right)."""
    height, width = int(original_hw[0]), int(original_hw[1])
    scale = size / max(height, width)
    inner_h, inner_w = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
    return (size - inner_h) // 2, (size - inner_w) // 2, inner_h, inner_w


def _largest_component(grey: np.ndarray) -> Optional[tuple[np.ndarray, int, np.ndarray]]:
    """(labels, label, stats row) of the largest bright component (`cv2.connectedComponentsWithStats`), or None
    when there is none worth the name."""
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    blurred = cv2.GaussianBlur(grey, (5, 5), 0)
    if int(blurred.max()) <= int(blurred.min()):
        return None
    otsu, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = (blurred > max(1.0, HEAD_OTSU_FRACTION * otsu)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < HEAD_MIN_AREA * grey.size:
        return None
    return labels, largest, stats[largest]


def find_head(grey: np.ndarray) -> Optional[np.ndarray]:
    """The head of a uint8 greyscale slice as a bool mask: the largest connected component (8-connected) of the
    pixels above half of Otsu's threshold (on a 5x5 Gaussian blur), with its holes filled; None when the image
    is flat or that component covers under `HEAD_MIN_AREA` of it."""
    found = _largest_component(grey)
    if found is None:
        return None
    labels, largest, _ = found
    component = (labels == largest).astype(np.uint8)
    # holes: background pixels not reachable from the border of a one-pixel frame around the image
    framed = cv2.copyMakeBorder(component, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    flood = framed.copy()
    cv2.floodFill(flood, np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8), (0, 0), 1)
    return (framed.astype(bool) | ~flood.astype(bool))[1:-1, 1:-1]


def head_box(grey: np.ndarray, margin: float) -> Optional[tuple[int, int, int]]:
    """(top, left, side) of the square around the head (see module doc), or None when no head is found."""
    found = _largest_component(grey)
    if found is None:
        return None
    stats = found[2]  # the component's bounding box, as OpenCV counted it with its pixels
    top, left = int(stats[cv2.CC_STAT_TOP]), int(stats[cv2.CC_STAT_LEFT])
    bottom, right = top + int(stats[cv2.CC_STAT_HEIGHT]), left + int(stats[cv2.CC_STAT_WIDTH])
    side = max(1, int(round(max(bottom - top, right - left) * (1.0 + 2.0 * margin))))
    # integer offsets of the head move the square by the same integers: the crop does not depend on the canvas
    centre_2y, centre_2x = top + bottom, left + right  # twice the centre, exact
    return int(math.floor((centre_2y - side) / 2)), int(math.floor((centre_2x - side) / 2)), side


def place(grey: np.ndarray, size: int, mode: str = "stretch", margin: float = DEFAULT_HEAD_MARGIN) -> Placement:
    """The placement of a decoded uint8 greyscale image on the (size, size) input in `mode`."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{mode}'; expected one of {', '.join(RESIZE_MODES)}")
    hw = (int(grey.shape[0]), int(grey.shape[1]))
    if mode != "head":
        return Placement(mode, hw, int(size))
    box = head_box(grey, margin)
    if box is None:
        return Placement("letterbox", hw, int(size), fallback=True)
    return Placement("head", hw, int(size), box=box)


def crop_box(image: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """The (side, side) square `box` = (top, left, side) of a 2-D array, zero where it leaves the image."""
    top, left, side = box
    height, width = image.shape[:2]
    pad = (max(0, -top), max(0, top + side - height), max(0, -left), max(0, left + side - width))
    if any(pad):
        image = cv2.copyMakeBorder(image, *pad, cv2.BORDER_CONSTANT, value=0)
        top, left = top + pad[0], left + pad[2]
    return image[top:top + side, left:left + side]


def logits_to_original(logits: torch.Tensor, original_hw: Sequence[int],
                       resize_mode: Union[str, Placement] = "stretch", fill: float = BACKGROUND_LOGIT
                       ) -> torch.Tensor:
    """Segmentation logits at the model's size, (N, 1, s, s), back onto the original (height, width).

    Logits (not thresholded masks) are interpolated bilinearly, then a caller thresholds them: resampling a
    binary mask with nearest neighbour would make staircase edges at every upscaling. With `letterbox` the
    padding is cropped away first (exact when the image's longest side equals the model size). `head` needs
    the image's `Placement` (from `place`); pixels outside its square get `fill` (background for logits; pass
    0 for heat maps). A Placement also works for the other modes.
    """
    placement = resize_mode if isinstance(resize_mode, Placement) else None
    mode = placement.mode if placement is not None else resize_mode
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{mode}'; expected one of {', '.join(RESIZE_MODES)}")
    height, width = int(original_hw[0]), int(original_hw[1])
    if mode == "head":
        if placement is None or placement.box is None:
            raise ValueError("resize mode 'head' maps back per image: pass its Placement (datasets.geometry.place)")
        if placement.original_hw != (height, width):
            raise ValueError(f"placement of a {placement.original_hw} image used for {(height, width)}")
        return _head_to_original(logits, (height, width), placement.box, fill)
    if mode == "letterbox":
        top, left, inner_h, inner_w = letterbox_box((height, width), logits.shape[-1])
        logits = logits[..., top:top + inner_h, left:left + inner_w]
    if tuple(logits.shape[-2:]) == (height, width):
        return logits
    return resize_bilinear(logits, (height, width))


def resize_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) maps resized bilinearly to `size` (height, width) in float32, pixel centres aligned as
    `F.interpolate(..., mode="bilinear", align_corners=False)`. On a CPU through OpenCV (a third of torch's
    time at 128 -> 512 px; OpenCV's float coefficients differ from torch's by at most 2e-5 of the maps' largest
    magnitude, tests/test_geometry_resize.py), elsewhere torch."""
    maps = maps.detach().float()
    if maps.device.type != "cpu":
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    n, c, h, w = maps.shape
    flat = np.ascontiguousarray(maps.reshape(n * c, h, w).numpy())
    out = np.empty((n * c, *size), dtype=np.float32)
    for index, plane in enumerate(flat):
        cv2.resize(plane, (size[1], size[0]), dst=out[index], interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(out).view(n, c, *size)


def _head_to_original(logits: torch.Tensor, hw: tuple[int, int], box: tuple[int, int, int], fill: float
                      ) -> torch.Tensor:
    top, left, side = box
    height, width = hw
    if tuple(logits.shape[-2:]) != (side, side):
        logits = resize_bilinear(logits, (side, side))
    out = logits.new_full((*logits.shape[:-2], height, width), fill)
    y0, y1, x0, x1 = max(0, top), min(height, top + side), max(0, left), min(width, left + side)
    if y1 > y0 and x1 > x0:
        out[..., y0:y1, x0:x1] = logits[..., y0 - top:y1 - top, x0 - left:x1 - left]
    return out
