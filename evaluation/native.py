"""Native-resolution segmentation counts: each image scored at its own size, not at the model's input size.

The model predicts at the training resolution (e.g. 128x128). Scoring there compares against a mask that was
itself resampled, which flatters or penalises small tumours depending on the resampling. Here the logits are
mapped back to the image's original (height, width) with `datasets.geometry.logits_to_original` (bilinear on
logits), thresholded, and compared with the original mask file binarised at >= 128. Sizes vary between images,
so the result is one row of pixel counts (TP, FP, FN, TN) per image, for one or several thresholds at once.
In head mode (`data.preprocess.resize: head`) each image sits on the input by its own `Placement`: pass `placement`
(stem -> Placement, e.g. `BriscDataset.placement`) and the logits go back through exactly that square.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from datasets.decode import read_grey
from datasets.geometry import Placement, logits_to_original
from datasets.index import Sample
from evaluation.boundary import boundary_distances
from evaluation.metrics import logit_of


def original_mask(sample: Sample) -> Optional[np.ndarray]:
    """The ground truth at the image's own size as a bool array; None when the image has no annotation."""
    if not sample.has_mask:
        return None
    if sample.mask is None:  # no-tumour image: an empty mask of the image's size (read from the header only)
        with Image.open(sample.image) as image:
            width, height = image.size
        return np.zeros((height, width), dtype=bool)
    return read_grey(sample.mask, what="mask") >= sample.mask_threshold


class NativeCounts:
    """Per-image TP, FP, FN, TN at the original size, for each of `thresholds` (on the sigmoid).

    `update(seg_logits, ids)` takes the model-size logits (B, 1, s, s) of a batch and the batch's stems;
    counts stay on the logits' device until `counts()` (one host copy at the end). With `boundary=True`, HD95
    and ASSD (`evaluation.boundary`) at the first threshold too, and each image's (height, width).
    `placement(stem)` gives an image's `Placement` (required in head mode, where the way back differs per
    image; when given, it is used in every mode).
    """

    def __init__(self, samples: Sequence[Sample], thresholds: Sequence[float], resize_mode: str = "stretch",
                 boundary: bool = False, spacing: Sequence[float] = (1.0, 1.0),
                 placement: Optional[Callable[[str], Placement]] = None) -> None:
        for t in thresholds:
            if not 0.0 < t < 1.0:
                raise ValueError(f"segmentation threshold must be in (0, 1), got {t}")
        if resize_mode == "head" and placement is None:
            raise ValueError("NativeCounts in resize mode 'head' needs placement=<stem -> Placement> (e.g. the "
                             "dataset's BriscDataset.placement): each image's head square maps its logits back")
        self.placement = placement
        self.samples = {s.stem: s for s in samples}
        self.thresholds = [float(t) for t in thresholds]
        self._logit_thresholds = [logit_of(t) for t in self.thresholds]
        self.resize_mode = resize_mode
        self._rows: dict[str, Optional[torch.Tensor]] = {}
        self.boundary, self.spacing = boundary, tuple(float(v) for v in spacing)
        self._extra: dict[str, tuple[float, float, int, int]] = {}  # stem -> (hd95, assd, height, width)

    @torch.no_grad()
    def update(self, seg_logits: torch.Tensor, ids: Sequence[str]) -> None:
        if seg_logits.shape[0] != len(ids):
            raise ValueError(f"{seg_logits.shape[0]} segmentation outputs for {len(ids)} ids")
        cuts = torch.tensor(self._logit_thresholds, device=seg_logits.device).view(-1, 1, 1)
        for i, stem in enumerate(ids):
            truth_np = original_mask(self.samples[stem])
            if truth_np is None:
                self._rows[stem] = None
                continue
            where = self.placement(stem) if self.placement is not None else self.resize_mode
            logits = logits_to_original(seg_logits[i:i + 1].float(), truth_np.shape, where)[0, 0]
            truth = torch.from_numpy(truth_np).to(logits.device)
            pred = logits.unsqueeze(0) >= cuts  # (thresholds, H, W)
            tp = (pred & truth).flatten(1).sum(1)
            fp = pred.flatten(1).sum(1) - tp
            fn = truth.sum() - tp
            tn = truth.numel() - tp - fp - fn
            self._rows[stem] = torch.stack([tp, fp, fn, tn], 1)
            if self.boundary:
                hd95, assd = boundary_distances(pred[0].cpu().numpy(), truth_np, self.spacing)
                self._extra[stem] = (hd95, assd, *truth_np.shape)

    def boundary_rows(self, ids: Sequence[str]) -> np.ndarray:
        """(N, 4) float: HD95, ASSD, height, width in the order of `ids`; NaN for unannotated images (HD95 /
        ASSD are NaN for an empty ground truth too)."""
        if not self.boundary:
            raise RuntimeError("boundary distances are only kept with NativeCounts(..., boundary=True)")
        nan = (math.nan,) * 4
        return np.array([self._extra.get(stem, nan) for stem in ids], dtype=np.float64).reshape(-1, 4)

    def counts(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(counts (N, thresholds, 4) int64 in the order of `ids`, annotated (N,) bool); unannotated rows are 0."""
        out = np.zeros((len(ids), len(self.thresholds), 4), dtype=np.int64)
        annotated = np.zeros(len(ids), dtype=bool)
        for n, stem in enumerate(ids):
            row = self._rows[stem]
            if row is not None:
                out[n] = row.cpu().numpy()
                annotated[n] = True
        return out, annotated


def geometry_summary(dataset) -> dict:
    """How `dataset`'s images were placed on the model's input, for metrics.json / shift.json: the resize mode
    and, in head mode, the margin and the images whose head was not found (letterboxed instead: the
    `fallback_stems`, over every image of the dataset)."""
    geometry: dict = {"resize": dataset.resize}
    if dataset.resize == "head":
        stems = dataset.head_fallbacks()
        geometry.update(head_margin=dataset.head_margin, head_fallbacks=len(stems), fallback_stems=stems)
    return geometry


def fallback_note(geometry: dict, num_images: int, where: str) -> Optional[str]:
    """One console line when head mode letterboxed some images of `where`; None otherwise."""
    n = geometry.get("head_fallbacks", 0)
    if not n:
        return None
    shown = ", ".join(geometry["fallback_stems"][:3]) + (", ..." if n > 3 else "")
    return (f"note: head not found in {n} of {num_images} images of {where} ({shown}); they were letterboxed "
            "instead (metrics.json: geometry.fallback_stems)")
