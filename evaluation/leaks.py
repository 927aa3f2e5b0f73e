"""Which evaluated images share content with the images the model trained on (the leak check of test.py).

`test` is checked against the release's whole train folder (the run trained on part of it and selected its
checkpoint on the rest); `val` against the train part of the run's split.json; `train` is the training data
itself, so no leak-free subset exists for it. The detection (identical or near-identical pixels) is
`datasets.duplicates.leaked_stems`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from datasets.duplicates import NEAR_THRESHOLD, leaked_stems
from datasets.errors import DataError
from datasets.index import Sample, classification_dir, index_split
from datasets.splits import load_split


def leak_check(root: Path, split: str, split_path: Path, eval_samples: Sequence[Sample],
               cache_dir: Optional[Path] = None, index: Callable[[Path, str], list[Sample]] = index_split,
               near_threshold: Optional[float] = NEAR_THRESHOLD) -> tuple[Optional[dict[str, list[str]]], dict]:
    """(evaluated stem -> matching training stems, or None when not applicable; a description for metrics.json,
    which records the `near_threshold` used: the run's `data.split.near_threshold`, None for exact copies only).

    `index(root, split)` lists a split's samples (the layout's indexer, datasets.factory.sample_index).
    `dev_test` is checked, like `val`, against the train part of the run's split.json."""
    if split == "train":
        return None, {"applied": False, "reason": "the evaluated split is the training data itself"}
    if index is index_split and not classification_dir(Path(root), "train").is_dir():
        return None, {"applied": False, "reason": f"'{root}' has no train split to compare with"}
    try:
        train_samples = index(root, "train")
    except DataError as exc:
        return None, {"applied": False, "reason": f"'{root}' has no readable train split to compare with ({exc})"}
    if split in ("val", "dev_test"):
        trained = set(load_split(split_path)["train"])
        train_samples = [s for s in train_samples if s.stem in trained]
        against = "the train part of the run's split.json"
    else:
        against = "the release's train split"
    leaked = leaked_stems(list(eval_samples), train_samples, near_threshold=near_threshold, cache_dir=cache_dir)
    return leaked, {"applied": True, "against": against, "num_training_images": len(train_samples),
                    "near_threshold": near_threshold,
                    "method": "datasets.duplicates.leaked_stems (identical pixels, or 32x32 thumbnail correlation "
                              f">= {near_threshold})" if near_threshold is not None else
                    "datasets.duplicates.leaked_stems (identical pixels only)"}
