"""Small fake copies of the other dataset layouts (`data.format: imagefolder | pairs`), for tests and demos.

Both are rearranged from a generated BRISC-layout dataset (datasets/synthetic.py), so their images carry the
same synthetic anatomy and tumours:

- imagefolder: `<out>/Training/<class>/*.jpg` and `<out>/Testing/<class>/*.jpg` with the Kaggle folder names
  (`glioma_tumor`, `meningioma_tumor`, `notumor`, `pituitary_tumor`), so the default class map is exercised;
- pairs: `<out>/images/<stem>.jpg` + `<out>/masks/<stem>_mask.png` for every image of both splits (no-tumour
  images get an empty mask file), one pool that the loader splits by `data.layout.test_fraction`.

    python -m datasets.synthetic_layouts --format imagefolder --out data/demo_imagefolder --train 200 --test 40
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from utils.cli import add_debug_flag, non_negative_int, positive_int, run_main
from utils.errors import InputError

from .index import classification_dir, masks_dir
from .naming import CLASS_NAMES, NO_TUMOR
from .synthetic import generate

LAYOUTS = ("imagefolder", "pairs")
KAGGLE_FOLDERS = {"glioma": "glioma_tumor", "meningioma": "meningioma_tumor", "no_tumor": "notumor",
                  "pituitary": "pituitary_tumor"}
PAIRS_MASK_SUFFIX = "_mask"


def _imagefolder(brisc: Path, out: Path) -> None:
    for split, folder in (("train", "Training"), ("test", "Testing")):
        for name in CLASS_NAMES:
            target = out / folder / KAGGLE_FOLDERS[name]
            target.mkdir(parents=True)
            for image in sorted((classification_dir(brisc, split) / name).glob("*.jpg")):
                shutil.copyfile(image, target / image.name)


def _pairs(brisc: Path, out: Path) -> None:
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for split in ("train", "test"):
        for label, name in enumerate(CLASS_NAMES):
            for image in sorted((classification_dir(brisc, split) / name).glob("*.jpg")):
                mask = masks_dir(brisc, split) / f"{image.stem}.png"
                shutil.copyfile(image, out / "images" / image.name)
                target = out / "masks" / f"{image.stem}{PAIRS_MASK_SUFFIX}.png"
                if mask.is_file():
                    shutil.copyfile(mask, target)
                elif label == NO_TUMOR:  # an empty mask of the image's size
                    height, width = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).shape
                    cv2.imwrite(str(target), np.zeros((height, width), np.uint8))


def generate_layout(out: Union[str, Path], layout: str, n_train: int = 200, n_test: int = 40, seed: int = 0,
                    verbose: bool = True) -> Path:
    """Write a fake `layout` dataset to `out` (a temporary folder renamed into place: complete or absent)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"'{out}' already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        brisc, staged = Path(tmp) / "brisc", Path(tmp) / "layout"
        generate(brisc, n_train, n_test, seed, verbose=False)
        (_imagefolder if layout == "imagefolder" else _pairs)(brisc, staged)
        try:
            os.rename(staged, out)
        except OSError:
            if out.exists():
                raise FileExistsError(f"'{out}' was created meanwhile by another process") from None
            raise
    if verbose:
        print(f"wrote a generated {layout}-layout dataset to {out}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=LAYOUTS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train", type=positive_int, default=200, help="images of the generated train split")
    parser.add_argument("--test", type=positive_int, default=40, help="images of the generated test split")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        generate_layout(args.out, args.format, args.train, args.test, args.seed)
    except (FileExistsError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
