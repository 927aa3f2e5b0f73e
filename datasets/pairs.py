"""Index an image/mask pair layout (`data.format: pairs`): segmentation only, no classes.

    <root>/images/<stem>.jpg  +  <root>/masks/<stem><mask_suffix>.png        (one pool, split by a seeded fraction)
    <root>/train/{images,masks}  and  <root>/test/{images,masks}            (the split given by the folders)

Images and masks are matched by file stem (a mask's stem is its image's stem plus `data.layout.mask_suffix`, e.g.
`_mask`); an image without a mask or a mask without an image is an error naming the file. Masks are binarised
at `data.layout.mask_threshold`. Samples carry `label = UNLABELLED` (-1): no class figure is ever computed for them.
Without train/test folders the test split is a seeded random `data.layout.test_fraction` of the pool (by
`data.split.seed`), the same on every call.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Union

from .errors import DataError
from .index import IMAGE_SUFFIXES, Sample, check_root, check_unique, list_files

UNLABELLED = -1  # the label of a sample from a layout without classes


def pair_folders(root: Path, split: str) -> tuple[Path, Path, bool]:
    """(images folder, masks folder, whether the split comes from folders) of `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if (root / "train" / "images").is_dir() or (root / "test" / "images").is_dir():
        return root / split / "images", root / split / "masks", True
    return root / "images", root / "masks", False


def _match(images_dir: Path, masks_dir: Path, mask_suffix: str) -> list[tuple[Path, Path]]:
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"folder '{folder}' does not exist; data.format=pairs needs <root>/images and "
                            "<root>/masks (or <root>/train/{images,masks} and <root>/test/{images,masks})")
    images = {p.stem: p for p in list_files(images_dir, IMAGE_SUFFIXES)}
    if not images:
        raise DataError(f"'{images_dir}' holds no images (.jpg/.jpeg/.png)")
    masks: dict[str, Path] = {}
    for path in list_files(masks_dir, IMAGE_SUFFIXES):
        if mask_suffix and not path.stem.endswith(mask_suffix):
            raise DataError(f"mask '{path}' does not end in data.layout.mask_suffix '{mask_suffix}'; rename it or set "
                            "data.layout.mask_suffix")
        masks[path.stem[: len(path.stem) - len(mask_suffix)] if mask_suffix else path.stem] = path
    lonely_images = sorted(set(images) - set(masks))
    if lonely_images:
        raise DataError(f"image '{images[lonely_images[0]]}' has no mask '{lonely_images[0]}{mask_suffix}.*' in "
                        f"'{masks_dir}' ({len(lonely_images)} unmatched image(s)); add the masks, remove the images "
                        "or set data.layout.mask_suffix")
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_masks:
        raise DataError(f"mask '{masks[lonely_masks[0]]}' has no image '{lonely_masks[0]}.*' in '{images_dir}' "
                        f"({len(lonely_masks)} unmatched mask(s)); add the images, remove the masks or set "
                        "data.layout.mask_suffix")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def index_pairs(root: Union[str, Path], split: str, mask_suffix: str = "", mask_threshold: int = 128,
                test_fraction: float = 0.2, seed: int = 42) -> list[Sample]:
    """The image/mask pairs of `split`; raises `DataError` on a broken layout."""
    root = check_root(root)
    images_dir, masks_dir, by_folder = pair_folders(root, split)
    pairs = _match(images_dir, masks_dir, mask_suffix)
    if not by_folder:
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        n_test = max(1, round(test_fraction * len(pairs)))
        if n_test >= len(pairs):
            raise DataError(f"'{images_dir}' holds {len(pairs)} pair(s): too few to hold out data.layout.test_fraction="
                            f"{test_fraction} as a test split and keep training images")
        chosen = set(order[:n_test]) if split == "test" else set(order[n_test:])
        pairs = [pair for i, pair in enumerate(pairs) if i in chosen]
    samples = [Sample(stem=image.stem, label=UNLABELLED, plane="", image=image, mask=mask,
                      mask_threshold=mask_threshold) for image, mask in pairs]
    check_unique(samples)
    return samples
