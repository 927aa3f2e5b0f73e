"""Index one split of a BRISC-layout dataset: which images exist, their class, plane and mask file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import GET_DATA_HINT, DataError
from .naming import CLASS_NAMES, NO_TUMOR, BriscNameError, parse_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")  # the one list of image files read anywhere


@dataclass(frozen=True)
class Sample:
    stem: str
    label: int
    plane: str
    image: Path
    mask: Optional[Path]  # None: no mask file (no-tumour images never have one)
    segmented: bool = True  # False: the layout has no masks at all (data.format imagefolder)
    mask_threshold: int = 128  # grey level from which a mask pixel is tumour (data.layout.mask_threshold for pairs)

    @property
    def has_mask(self) -> bool:
        """Whether the mask is known: a no-tumour image has an empty mask by definition (in a layout with masks)."""
        return self.segmented and (self.label == NO_TUMOR or self.mask is not None)


def classification_dir(root: Path, split: str) -> Path:
    return root / "classification_task" / split


def masks_dir(root: Path, split: str) -> Path:
    return root / "segmentation_task" / split / "masks"


def list_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Visible files in `folder` whose suffix is one of `suffixes`, sorted by name."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and e.name.lower().endswith(suffixes)]
    return [folder / name for name in sorted(names)]


def unknown_class_folders(cls_dir: Path) -> list[Path]:
    """Visible sub-folders of a split's classification folder that are not one of CLASS_NAMES."""
    return sorted(p for p in cls_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in CLASS_NAMES)


def check_root(root: Union[str, Path]) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root '{root}' does not exist or is not a folder.\n{GET_DATA_HINT}")
    return root


def index_split(root: Union[str, Path], split: str) -> list[Sample]:
    """All classification images of `split`, with their masks; raises `DataError` on a broken layout.

    Each image is labelled by its class folder, and its file-name code must agree. Masks come from
    `segmentation_task/<split>/masks/<stem>.png`; tumour images without one get `mask=None`.
    """
    root = check_root(root)
    cls_dir = classification_dir(root, split)
    if not cls_dir.is_dir():
        found = sorted(p.name for p in (root / "classification_task").glob("*") if p.is_dir())
        raise DataError(
            f"split folder '{cls_dir}' does not exist (splits found: {', '.join(found) or 'none'}).\n{GET_DATA_HINT}"
        )
    mask_folder = masks_dir(root, split)
    mask_stems = {p.stem for p in list_files(mask_folder, (".png",))} if mask_folder.is_dir() else set()

    extra = unknown_class_folders(cls_dir)
    if extra:
        raise DataError(f"'{extra[0]}' is not one of the configured classes ({', '.join(CLASS_NAMES)}); move or "
                        f"remove {'it' if len(extra) == 1 else f'the {len(extra)} folders of unknown classes'} "
                        "(every class folder is used, none is skipped silently)")
    samples: list[Sample] = []
    for label, class_name in enumerate(CLASS_NAMES):
        folder = cls_dir / class_name
        if not folder.is_dir():
            raise DataError(f"class folder '{folder}' is missing.\n{GET_DATA_HINT}")
        files = list_files(folder, IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder '{folder}' holds no images ({'/'.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                name = parse_name(path)
            except BriscNameError as exc:
                raise DataError(f"cannot index '{path}': {exc}") from None
            if name.label != label:
                raise DataError(
                    f"'{path}' is in the '{class_name}' folder but its name says '{name.class_name}' "
                    f"(code '{name.code}'); move or rename the file"
                )
            mask = None
            if label != NO_TUMOR and name.stem in mask_stems:
                mask = mask_folder / f"{name.stem}.png"
            samples.append(Sample(stem=name.stem, label=label, plane=name.plane, image=path, mask=mask))

    samples.sort(key=lambda s: s.stem)
    check_unique(samples)
    return samples


def check_unique(samples: list[Sample]) -> None:
    seen: dict[str, Path] = {}
    for sample in samples:
        if sample.stem in seen:
            raise DataError(f"'{sample.image}' and '{seen[sample.stem]}' share the stem '{sample.stem}'")
        seen[sample.stem] = sample.image
