"""Integrity report of an imagefolder- or pairs-layout dataset (`python -m datasets.check ROOT --format ...`).

The layout is indexed with the loader's own indexer (so a missing folder, an unknown class folder or an
unmatched image or mask stops with the loader's error), then every image and mask is decoded once.
Errors: unreadable images or masks, images below the minimum size, masks of another size than their image.
Warnings: 16-bit images, empty masks (pairs), the same decoded pixels within a split or across train and test.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .integrity_report import Report, report_identical_content
from .decode import decode_grey, read_grey
from .errors import DataError
from .index import Sample
from .naming import CLASS_NAMES


def _inspect(sample: Sample) -> dict:
    """Decoded facts of one sample: pixel digest, bit depth, mask foreground, or the problem found."""
    facts: dict = {"sample": sample, "problem": "", "digest": "", "depth": 8, "foreground": None}
    try:
        grey, facts["depth"] = decode_grey(sample.image)
        facts["digest"] = hashlib.blake2b(grey.tobytes(), digest_size=16).hexdigest()
        if sample.mask is not None:
            mask = read_grey(sample.mask, what="mask")
            if mask.shape != grey.shape:
                facts["problem"] = (f"mask '{sample.mask}' is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                    f"{grey.shape[1]}x{grey.shape[0]}")
            facts["foreground"] = int(np.count_nonzero(mask >= sample.mask_threshold))
    except DataError as exc:
        facts["problem"] = str(exc)
    return facts


def check_layout(root: Path, index: Callable[[Path, str], list[Sample]], layout: str, examples: int = 5,
                 workers: int = 4) -> Report:
    """Index both splits with `index(root, split)` and decode every file; a broken layout raises `DataError`."""
    report = Report(examples=examples)
    digests: dict[str, dict[str, list[str]]] = {}
    with ThreadPoolExecutor(workers) as pool:
        for split in ("train", "test"):
            samples = index(Path(root), split)
            counts = Counter(s.label for s in samples)
            classes = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(CLASS_NAMES))
            report.info.append(f"{split}: {len(samples)} images" + (f" ({classes})" if layout == "imagefolder"
                                                                     else f", {len(samples)} masks"))
            seen: dict[str, list[str]] = defaultdict(list)
            for facts in pool.map(_inspect, samples):
                sample = facts["sample"]
                if facts["problem"]:
                    report.error("unreadable or mismatched file", facts["problem"])
                    continue
                if facts["depth"] != 8:
                    report.warn("16-bit image (scaled to 8 bits by its bit depth in use)", str(sample.image))
                if facts["foreground"] == 0:
                    report.warn("empty mask", str(sample.mask))
                seen[facts["digest"]].append(str(sample.image))
            digests[split] = seen
    report_identical_content(report, digests)
    return report


def layout_index(fmt: str, train_dir: str = "Training", test_dir: str = "Testing",
                 class_map: Optional[dict] = None, mask_suffix: str = "", mask_threshold: int = 128,
                 test_fraction: float = 0.2, split_seed: int = 42) -> Callable[[Path, str], list[Sample]]:
    """The loader's indexer for `fmt`, from the same settings as the `data.*` config keys."""
    from utils.config import DataConfig, LayoutConfig, SplitConfig

    from .factory import sample_index

    layout = LayoutConfig(train_dir=train_dir, test_dir=test_dir, class_map=class_map or {}, mask_suffix=mask_suffix,
                          mask_threshold=mask_threshold, test_fraction=test_fraction)
    return sample_index(DataConfig(format=fmt, layout=layout, split=SplitConfig(seed=split_seed)))
