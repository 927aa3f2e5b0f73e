"""BRISC 2025 file names: `brisc2025_{split}_{index:05d}_{code}_{plane}_t1.{jpg|png}`.

The file name carries the class (code) and the imaging plane; the classification folder carries the class
too, and the loader checks that the two agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

CLASS_NAMES = ["glioma", "meningioma", "no_tumor", "pituitary"]
NO_TUMOR = CLASS_NAMES.index("no_tumor")

# The release uses `no`; some third-party descriptions say `nt`, so it is accepted as an alias.
CODE_TO_LABEL = {"gl": 0, "me": 1, "no": 2, "nt": 2, "pi": 3}
LABEL_TO_CODE = {0: "gl", 1: "me", 2: "no", 3: "pi"}
PLANES = {"ax": "axial", "co": "coronal", "sa": "sagittal"}

LAYOUT = """\
Expected BRISC 2025 layout (Kaggle dataset briscdataset/brisc2025):
  <root>/classification_task/{train,test}/{glioma,meningioma,no_tumor,pituitary}/brisc2025_<split>_<index>_<code>_<plane>_t1.jpg
  <root>/segmentation_task/{train,test}/images/<stem>.jpg
  <root>/segmentation_task/{train,test}/masks/<stem>.png      (tumour classes only)
  codes: gl, me, no (alias nt), pi; planes: ax, co, sa"""

_NAME = re.compile(r"^brisc2025_(?P<split>[a-z]+)_(?P<index>\d{5})_(?P<code>[a-z]+)_(?P<plane>[a-z]+)_t1$")


class BriscNameError(ValueError):
    """A file name that does not follow the BRISC 2025 naming scheme."""


@dataclass(frozen=True)
class BriscName:
    stem: str
    split: str
    index: int
    code: str
    plane: str

    @property
    def label(self) -> int:
        return CODE_TO_LABEL[self.code]

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def parse_name(name: Union[str, Path]) -> BriscName:
    """Parse a BRISC file name or path (any extension); raises `BriscNameError` naming the file."""
    stem = Path(name).stem
    match = _NAME.match(stem)
    if match is None:
        raise BriscNameError(
            f"'{name}' does not follow the BRISC naming scheme brisc2025_<split>_<5-digit index>_<code>_<plane>_t1"
        )
    code, plane = match["code"], match["plane"]
    if code not in CODE_TO_LABEL:
        raise BriscNameError(f"'{name}': unknown class code '{code}' (known: {', '.join(CODE_TO_LABEL)})")
    if plane not in PLANES:
        raise BriscNameError(f"'{name}': unknown plane '{plane}' (known: {', '.join(PLANES)})")
    return BriscName(stem=stem, split=match["split"], index=int(match["index"]), code=code, plane=plane)


def format_name(split: str, index: int, label: int, plane: str) -> str:
    """The stem of a BRISC file (`brisc2025_train_00001_gl_ax_t1`)."""
    if plane not in PLANES:
        raise BriscNameError(f"unknown plane '{plane}' (known: {', '.join(PLANES)})")
    return f"brisc2025_{split}_{index:05d}_{LABEL_TO_CODE[label]}_{plane}_t1"
