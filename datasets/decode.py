"""Decode one sample from disk into square uint8 arrays at the training size (greyscale image, 0/255 mask).

This is the only place that touches image files during training; every failure names the file.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import DataError
from .index import Sample

MASK_THRESHOLD = 128  # masks carry JPEG-like ringing (0-10 / 246-255)


def read_grey(path: Path, what: str = "image") -> np.ndarray:
    """An image file as one uint8 greyscale channel (3-channel files hold grey content)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {what} '{path}': {exc}") from None
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None:
        raise DataError(f"cannot decode {what} '{path}': empty, truncated or not an image file")
    return image


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def binarize(mask: np.ndarray) -> np.ndarray:
    """0/255 uint8 from a grey mask (threshold 128)."""
    return np.where(mask >= MASK_THRESHOLD, np.uint8(255), np.uint8(0))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a 0/255 mask and threshold again: an area/linear resample followed by the threshold is a
    per-pixel majority vote, which keeps small tumours better than nearest-neighbour sampling. A tumour
    too small to cover half of any output pixel keeps its most covered pixel(s) instead of vanishing."""
    coverage = resize_image(mask, size)
    out = binarize(coverage)
    if not out.any() and coverage.max() > 0:
        out = np.where(coverage == coverage.max(), np.uint8(255), np.uint8(0))
    return out


def load_sample(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of one sample as (size, size) uint8 arrays; the mask is 0/255 and empty without a file."""
    image = read_grey(sample.image)
    if sample.mask is None:
        return resize_image(image, size), np.zeros((size, size), np.uint8)
    mask = read_grey(sample.mask, what="mask")
    if mask.shape != image.shape:
        raise DataError(
            f"mask '{sample.mask}' is {mask.shape[1]}x{mask.shape[0]} but its image '{sample.image}' is "
            f"{image.shape[1]}x{image.shape[0]}; masks must have their image's size"
        )
    return resize_image(image, size), resize_mask(binarize(mask), size)
