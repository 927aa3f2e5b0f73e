"""Index an image-folder layout (`data.format: imagefolder`): `<root>/<split folder>/<class folder>/*.jpg`.

The common Kaggle brain-tumour classification sets use this layout with `Training` / `Testing` split folders
(`data.layout.train_dir`, `data.layout.test_dir`) and their own class names (`glioma_tumor`, `notumor`, ...). Folder names
map onto the project's classes through `KAGGLE_CLASS_MAP` plus `data.layout.class_map` (which wins). The layout has no
masks: every sample has `segmented=False` (has_mask False), so a run on it trains and scores classification only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

from .errors import DataError
from .index import IMAGE_SUFFIXES, Sample, check_root, check_unique, list_files
from .naming import CLASS_NAMES

# Folder names of the common Kaggle sets (and the project's own names) -> project class.
KAGGLE_CLASS_MAP = {
    **{name: name for name in CLASS_NAMES},
    "glioma_tumor": "glioma", "meningioma_tumor": "meningioma", "pituitary_tumor": "pituitary",
    "notumor": "no_tumor", "no_tumour": "no_tumor", "normal": "no_tumor",
}


def class_map(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Folder name -> class name; `extra` (data.layout.class_map) adds or overrides entries and must name known classes."""
    mapping = dict(KAGGLE_CLASS_MAP)
    for folder, name in (extra or {}).items():
        if name not in CLASS_NAMES:
            raise DataError(f"data.layout.class_map maps '{folder}' to '{name}', which is not a class "
                            f"({', '.join(CLASS_NAMES)}); fix the entry")
        mapping[str(folder)] = name
    return mapping


def split_folder(root: Path, split: str, train_dir: str, test_dir: str) -> Path:
    """The folder of `split` ("train" -> data.layout.train_dir, "test" -> data.layout.test_dir)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return root / (train_dir if split == "train" else test_dir)


def class_folders(root: Union[str, Path], split: str, train_dir: str = "Training", test_dir: str = "Testing"
                  ) -> tuple[Path, list[Path]]:
    """(the split's folder, its visible class folders, sorted); raises `DataError` when the split folder is missing."""
    root = check_root(root)
    folder = split_folder(root, split, train_dir, test_dir)
    key = "data.layout.train_dir" if split == "train" else "data.layout.test_dir"
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(f"split folder '{folder}' does not exist (folders found: {', '.join(found) or 'none'}); "
                        f"set {key} to the folder holding the {split} split's class folders")
    return folder, sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_samples(class_dir: Path, label: int) -> list[Sample]:
    """The images of one class folder as unsegmented samples of `label`; raises `DataError` when it has none."""
    files = list_files(class_dir, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"class folder '{class_dir}' holds no images (.jpg/.jpeg/.png)")
    return [Sample(stem=p.stem, label=label, plane="", image=p, mask=None, segmented=False) for p in files]


def index_imagefolder(root: Union[str, Path], split: str, train_dir: str = "Training", test_dir: str = "Testing",
                      extra_map: Optional[Mapping[str, str]] = None) -> list[Sample]:
    """All images of one split, labelled by their class folder; raises `DataError` on a broken layout."""
    folder, class_dirs = class_folders(root, split, train_dir, test_dir)
    mapping = class_map(extra_map)
    unknown = [p for p in class_dirs if p.name not in mapping]
    if unknown:
        raise DataError(f"class folder '{unknown[0]}' is not a known class ({', '.join(CLASS_NAMES)}); map it with "
                        f"--opts data.layout.class_map.{unknown[0].name}=<class>, or move it out of '{folder}'")
    seen: dict[str, Path] = {}
    samples: list[Sample] = []
    for class_dir in class_dirs:
        name = mapping[class_dir.name]
        if name in seen:
            raise DataError(f"'{class_dir}' and '{seen[name]}' both map to class '{name}'; keep one folder per class")
        seen[name] = class_dir
        samples += folder_samples(class_dir, CLASS_NAMES.index(name))
    missing = [name for name in CLASS_NAMES if name not in seen]
    if missing and split == "train":
        raise DataError(f"'{folder}' has no folder for class(es) {', '.join(missing)} (found: "
                        f"{', '.join(p.name for p in class_dirs) or 'none'}); add them or map a folder with "
                        "data.layout.class_map")
    samples.sort(key=lambda s: s.stem)
    check_unique(samples)
    return samples
