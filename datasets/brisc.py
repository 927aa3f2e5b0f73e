"""`BriscDataset`: one sample per classification image of a BRISC-layout split, as a batch-contract dict."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.config import AugmentConfig

from .cache import CACHE_MODES, ArrayCache
from .decode import load_sample, sample_placement
from .geometry import DEFAULT_HEAD_MARGIN, Placement
from .errors import DataError
from .index import index_split
from .naming import CLASS_NAMES, PLANES
from .transforms import RandomCanvas, build_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BriscDataset(Dataset):
    """Images of `<root>/classification_task/<split>`, labelled by folder, with masks from `segmentation_task`.

    Each item: `image` float (C, H, W) normalised, `mask` float (1, H, W) in {0, 1}, `label` long,
    `has_mask` bool (False only for a tumour image without a mask file), `id` the file stem.
    `stems` restricts the split to a subset (the train/val parts of a saved split); `resize` places each
    image on the square input (stretch | letterbox | head with `head_margin`, see geometry.py); `placement(i)`
    says where image i sits (what `geometry.logits_to_original` needs to map its logits back).
    """

    def __init__(
        self,
        root: Union[str, Path],
        split: str,
        image_size: int = 256,
        train: bool = False,
        in_channels: int = 3,
        stems: Optional[Iterable[str]] = None,
        augment: Optional[AugmentConfig] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cache: str = "none",
        cache_dir: Optional[Union[str, Path]] = None,
        verbose: bool = True,
        name: Optional[str] = None,
        resize: str = "stretch",
        intensity_norm: str = "imagenet",
        percentile_range: Sequence[float] = (0.5, 99.5),
        index: Optional[Callable[[Path, str], list]] = None,
        head_margin: float = DEFAULT_HEAD_MARGIN,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
        self.root, self.split, self.image_size, self.train = Path(root), split, int(image_size), train
        self.in_channels, self.resize, self.head_margin = in_channels, resize, float(head_margin)
        self._placements: dict[int, Placement] = {}
        self._positions: Optional[dict[str, int]] = None
        self.name = name or split
        self.class_names = list(CLASS_NAMES)
        # `index(root, split)` lists the samples: BRISC by default, another layout's indexer (datasets/factory.py)
        self.samples = (index or index_split)(self.root, split)
        if stems is not None:
            self.samples = self._restrict(self.samples, stems)
        self.stems = [s.stem for s in self.samples]
        self.labels = [s.label for s in self.samples]
        self.transform = build_transform(self.image_size, train, augment, in_channels, mean, std, intensity_norm,
                                         percentile_range)
        # a random canvas acts on the decoded file before the geometry step: those samples are read from the file
        use_canvas = train and augment is not None and augment.p_canvas > 0
        self.canvas = RandomCanvas(augment.p_canvas, augment.canvas_ratio) if use_canvas else None
        # Optional (image, mask, stem) -> (image, mask) on the decoded uint8 arrays before the transform
        # (the acquisition-shift benchmark sets it).
        self.shift: Optional[Callable[[np.ndarray, np.ndarray, str], tuple[np.ndarray, np.ndarray]]] = None
        self._warn_unannotated()
        self.cache_mode = cache
        self.cache = (
            ArrayCache(self.samples, self.image_size, cache, cache_dir, split=self.name, verbose=verbose,
                       resize=resize, head_margin=self.head_margin)
            if cache != "none"
            else None
        )
        if verbose:
            print(self.summary())

    def _restrict(self, samples: list, stems: Iterable[str]) -> list:
        wanted = set(stems)
        kept = [s for s in samples if s.stem in wanted]
        if len(kept) != len(wanted):
            missing = sorted(wanted - {s.stem for s in kept})
            raise DataError(
                f"{len(missing)} requested stem(s) are not in '{self.root}' split '{self.split}' "
                f"(e.g. {', '.join(missing[:3])}); was the split file made for another dataset?"
            )
        if not kept:
            raise DataError(f"no samples selected from '{self.root}' split '{self.split}' (empty stem list)")
        return kept

    def _warn_unannotated(self) -> None:
        unannotated = [s.stem for s in self.samples if s.segmented and not s.has_mask]
        if unannotated:
            warnings.warn(
                f"{self.name}: {len(unannotated)} tumour image(s) under '{self.root}' have no mask file "
                f"(e.g. {', '.join(unannotated[:3])}); they get has_mask=False and no segmentation loss",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        if self.canvas is not None and self.canvas.fires():
            image, mask = load_sample(sample, self.image_size, self.resize, self.head_margin, canvas=self.canvas)
        elif self.cache is not None:
            image, mask = self.cache.get(i)
        else:
            image, mask = load_sample(sample, self.image_size, self.resize, self.head_margin)
        if self.shift is not None:
            image, mask = self.shift(image, mask, sample.stem)
        image_t, mask_t = self.transform(image, mask)
        return {
            "image": image_t,
            "mask": mask_t,
            "label": torch.tensor(sample.label, dtype=torch.long),
            "has_mask": torch.tensor(sample.has_mask),
            "id": sample.stem,
        }

    def placement(self, i: Union[int, str]) -> Placement:
        """Where image i (a position, or a stem as in the batch's `id`) sits on the model's input, decoded again
        from its file once, then remembered; `fallback` is True when head mode found no head and letterboxed it.
        `geometry.logits_to_original(logits, placement.original_hw, placement)` maps its logits back."""
        if isinstance(i, str):
            if self._positions is None:
                self._positions = {stem: n for n, stem in enumerate(self.stems)}
            i = self._positions[i]
        if i not in self._placements:
            self._placements[i] = sample_placement(self.samples[i], self.image_size, self.resize, self.head_margin)
        return self._placements[i]

    def head_fallbacks(self) -> list[str]:
        """Stems of the images that head mode could not place (letterboxed instead); empty in other modes."""
        if self.resize != "head":
            return []
        return [stem for n, stem in enumerate(self.stems) if self.placement(n).fallback]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}

    def plane_counts(self) -> dict[str, int]:
        counts = Counter(s.plane for s in self.samples)
        return {plane: counts.get(plane, 0) for plane in PLANES}

    def summary(self) -> str:
        classes = " | ".join(f"{k} {v}" for k, v in self.class_counts().items())
        planes = " | ".join(f"{k} {v}" for k, v in self.plane_counts().items())
        annotated = sum(1 for s in self.samples if s.mask is not None)
        missing = sum(1 for s in self.samples if not s.has_mask)
        mode = "train augmentations" if self.train else "eval transforms"
        if all(label < 0 for label in self.labels):  # data.format pairs
            classes = "none (a layout without classes: segmentation only)"
        if not any(s.plane for s in self.samples):
            planes = "unknown"
        masks = f"tumour masks: {annotated} ({missing} missing)"
        if not any(s.segmented for s in self.samples):  # data.format imagefolder
            masks = "no masks (a layout without masks: classification only)"
        return (
            f"[data] {self.name}: {len(self)} images from {self.root} ({self.split}), {self.image_size}px "
            f"{self.resize}, {self.in_channels} ch, {mode}, cache={self.cache_mode}\n"
            f"       classes: {classes}\n"
            f"       planes:  {planes}; {masks}"
        )
