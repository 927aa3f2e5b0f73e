"""Decode one sample from disk into square uint8 arrays at the training size (greyscale image, 0/255 mask),
stretched, letterboxed or cropped to the head (`data.preprocess.resize`; the placement is defined in geometry.py).

This is the only place that touches image files during training; every failure names the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import cv2
import numpy as np

from .errors import DataError
from .geometry import DEFAULT_HEAD_MARGIN, Placement, crop_box, letterbox_box, place
from .index import Sample

MASK_THRESHOLD = 128  # masks carry JPEG-like ringing (0-10 / 246-255)


MIN_IMAGE_SIDE = 32  # pixels: smaller images are refused (nothing of a tumour is left to segment)


class ImageTooSmallError(DataError):
    """An image below MIN_IMAGE_SIDE on a side."""


def decode_grey(path: Path, what: str = "image") -> tuple[np.ndarray, int]:
    """An image file as one uint8 greyscale channel, and the bit depth it was stored with (8 or 16; 32 for float).

    8-bit files decode exactly as `cv2.IMREAD_GRAYSCALE` (3-channel files hold grey content). Deeper files (MRI
    exports often keep 12-bit data in 16-bit PNGs) are scaled by `depth_scale`: 0 stays 0 and the largest value
    the bits in use can hold (2^k - 1, the smallest such >= the file's maximum, k >= 8) becomes 255. Every file
    of one scanner and bit depth gets the same grey levels for the same values, whatever its own range; reading
    them as 8-bit would keep only the top byte (0-15).
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {what} '{path}': {exc}") from None
    return decode_grey_buffer(data, str(path), what)


def depth_scale(image: np.ndarray) -> float:
    """The full scale of a deep (16-bit or float) image: 2^k - 1 for the smallest k with 2^k - 1 >= its maximum,
    k >= 8 for integers (8-bit data in a 16-bit file stays as it is) and k >= 1 for floats (0..1 data: 1)."""
    top = float(image.max()) if image.size else 0.0
    k = max(8 if image.dtype.kind in "ui" else 1, int(np.ceil(np.log2(max(top, 0.0) + 1.0))))
    return float(2**k - 1)


def decode_grey_buffer(data: np.ndarray, path: str, what: str = "image") -> tuple[np.ndarray, int]:
    """`decode_grey` of a file's bytes already in memory (uint8 array; `path` names it in errors)."""
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise DataError(f"cannot decode {what} '{path}': empty, truncated or not an image file")
    depth = 8 * image.dtype.itemsize
    if image.dtype != np.uint8:
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise DataError(f"{what} '{path}' holds non-finite pixel values")
        # negative values (signed or float files) are below the black level: clipped to 0
        scaled = np.clip(image.astype(np.float64), 0.0, None) * (255.0 / depth_scale(image))
        image = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if what != "mask" and min(image.shape) < MIN_IMAGE_SIDE:  # a mask must match its image's size instead
        raise ImageTooSmallError(f"{what} '{path}' is {image.shape[1]}x{image.shape[0]} pixels; images smaller "
                                 f"than {MIN_IMAGE_SIDE} px on a side are refused")
    return image, depth


def read_grey(path: Path, what: str = "image") -> np.ndarray:
    """An image file as one uint8 greyscale channel (see `decode_grey`); raises `DataError` naming the file."""
    return decode_grey(path, what)[0]


def resize_image(image: np.ndarray, size: Union[int, tuple[int, int]]) -> np.ndarray:
    """Resize to (size, size) or to (height, width): area averaging when shrinking, bilinear otherwise."""
    height, width = (size, size) if isinstance(size, int) else size
    if image.shape == (height, width):
        return image
    shrinking = image.shape[0] > height or image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def binarize(mask: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """0/255 uint8 from a grey mask (tumour from `threshold`, 128 by default)."""
    return np.where(mask >= threshold, np.uint8(255), np.uint8(0))


def resize_mask(mask: np.ndarray, size: Union[int, tuple[int, int]]) -> np.ndarray:
    """Resize a 0/255 mask and threshold again: an area/linear resample followed by the threshold is a
    per-pixel majority vote, which keeps small tumours better than nearest-neighbour sampling. A tumour
    too small to cover half of any output pixel keeps its most covered pixel(s) instead of vanishing."""
    coverage = resize_image(mask, size)
    out = binarize(coverage)
    if not out.any() and coverage.max() > 0:
        out = np.where(coverage == coverage.max(), np.uint8(255), np.uint8(0))
    return out


def to_square(image: np.ndarray, size: int, resize: Union[str, Placement] = "stretch", is_mask: bool = False,
              margin: float = DEFAULT_HEAD_MARGIN) -> np.ndarray:
    """A greyscale image (or a 0/255 mask) on the model's (size, size) input, by `resize` mode: stretched,
    letterboxed (scaled into `geometry.letterbox_box`, zero padding around it) or cropped to the head's square
    (`geometry.place`, with `margin`). A mask needs its image's `Placement` in head mode."""
    placement = resize if isinstance(resize, Placement) else None
    if placement is None:
        if resize == "head" and is_mask:
            raise ValueError("a mask is placed by its image's head: pass the image's Placement")
        placement = place(image, size, resize, margin)
    fit = resize_mask if is_mask else resize_image
    if placement.mode == "stretch":
        return fit(image, size)
    if placement.mode == "head":
        return fit(np.ascontiguousarray(crop_box(image, placement.box)), size)
    top, left, height, width = letterbox_box(image.shape[:2], size)
    return cv2.copyMakeBorder(fit(image, (height, width)), top, size - top - height, left, size - left - width,
                              cv2.BORDER_CONSTANT, value=0)


def read_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(grey image, 0/255 mask) of one sample at the file's own size; the mask is empty without a file."""
    image = read_grey(sample.image)
    if sample.mask is None:
        return image, np.zeros(image.shape, np.uint8)
    mask = read_grey(sample.mask, what="mask")
    if mask.shape != image.shape:
        raise DataError(
            f"mask '{sample.mask}' is {mask.shape[1]}x{mask.shape[0]} but its image '{sample.image}' is "
            f"{image.shape[1]}x{image.shape[0]}; masks must have their image's size"
        )
    return image, binarize(mask, sample.mask_threshold)


def place_pair(image: np.ndarray, mask: np.ndarray, size: int, resize: str = "stretch",
               margin: float = DEFAULT_HEAD_MARGIN) -> tuple[np.ndarray, np.ndarray, Placement]:
    """An image and its 0/255 mask at the file's size on the (size, size) input, both placed by the image."""
    placement = place(image, size, resize, margin)
    return to_square(image, size, placement), to_square(mask, size, placement, is_mask=True), placement


def load_sample(sample: Sample, size: int, resize: str = "stretch", margin: float = DEFAULT_HEAD_MARGIN,
                canvas: Optional[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of one sample as (size, size) uint8 arrays placed by `resize` (stretch | letterbox | head,
    `margin` for head); the mask is 0/255 and empty without a file. `canvas(image, mask)` (a training
    augmentation) changes the decoded pair before the placement."""
    image, mask = read_pair(sample)
    if canvas is not None:
        image, mask = canvas(image, mask)
    return place_pair(image, mask, size, resize, margin)[:2]


def sample_placement(sample: Sample, size: int, resize: str = "stretch",
                     margin: float = DEFAULT_HEAD_MARGIN) -> Placement:
    """The `Placement` of a sample's image (decoded again from its file): what maps its logits back."""
    return place(read_grey(sample.image), size, resize, margin)
