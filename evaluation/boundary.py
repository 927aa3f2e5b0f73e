"""Boundary distances between a predicted and a true tumour mask: HD95 and ASSD, at the image's own size.

Conventions (stated in metric_definitions.md):
- The surface (contour) of a mask is its foreground pixels with at least one 4-neighbour in the background
  (outside the image counts as background). Distances are Euclidean, between pixel centres, in pixels, or in
  the units of `spacing` (row, column) when a dataset has a pixel spacing.
- HD95: the larger of the two directed 95th percentiles of surface-to-nearest-surface distances (the MONAI /
  `surface-distance` convention). ASSD: the mean of all those distances, both directions pooled.
- Empty ground truth: undefined (NaN); such images are left out of the mean and counted by `empty_fp_rate`.
- Empty prediction on a tumour image: both distances are the image diagonal (the largest distance possible in
  the image), so a missed tumour is the worst boundary score, not a skipped one.

Speed: both masks are cropped to the bounding box of their union before the distance transform; every surface
pixel lies inside that box, so nearest-surface distances are unchanged and a 512x512 image with a small tumour
costs a transform over a few thousand pixels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

# 4-connectivity: a pixel whose up/down/left/right neighbour is background is on the contour.
_CROSS = ndimage.generate_binary_structure(2, 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """The contour pixels of a bool mask (foreground with a background 4-neighbour; the image edge is background)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance of each pixel of `from_surface` to the nearest pixel of `to_surface`."""
    return ndimage.distance_transform_edt(~to_surface, sampling=spacing)[from_surface]


def boundary_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)
                       ) -> tuple[float, float]:
    """(HD95, ASSD) of two same-shape 2-D bool masks; NaN for an empty truth, the diagonal for an empty
    prediction on a non-empty truth."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    pred, truth = pred.astype(bool, copy=False), truth.astype(bool, copy=False)
    if not truth.any():
        return float("nan"), float("nan")
    if not pred.any():
        diagonal = float(np.hypot(truth.shape[0] * spacing[0], truth.shape[1] * spacing[1]))
        return diagonal, diagonal
    rows, cols = np.nonzero(pred | truth)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    # The crop edge is background in the full image too, unless it is the image edge (background as well).
    pred_surface, truth_surface = surface(pred[box]), surface(truth[box])
    forward = _directed(pred_surface, truth_surface, spacing)
    backward = _directed(truth_surface, pred_surface, spacing)
    hd95 = max(float(np.percentile(forward, 95)), float(np.percentile(backward, 95)))
    assd = float((forward.sum() + backward.sum()) / (len(forward) + len(backward)))
    return hd95, assd


def brute_force_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)
                          ) -> tuple[float, float]:
    """The same figures by all pairwise distances between contour pixels (small masks only): a reference."""
    def contour(mask: np.ndarray) -> np.ndarray:  # written out without scipy: any 4-neighbour in the background
        m = np.pad(mask.astype(bool), 1)
        inner = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        return np.argwhere(m[1:-1, 1:-1] & ~inner) * np.asarray(spacing, dtype=np.float64)

    a, b = contour(pred), contour(truth)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    forward, backward = pairwise.min(1), pairwise.min(0)
    hd95 = max(float(np.percentile(forward, 95)), float(np.percentile(backward, 95)))
    return hd95, float((forward.sum() + backward.sum()) / (len(forward) + len(backward)))
