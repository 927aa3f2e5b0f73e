"""Which evaluated images share content with the images the model trained on (the leak check of test.py).

`test` is checked against the release's whole train folder (the run trained on part of it and selected its
checkpoint on the rest); `val` against the train part of the run's split.json; `train` is the training data
itself, so no leak-free subset exists for it. The detection (identical or near-identical pixels) is
`datasets.duplicates.leaked_stems`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from datasets.errors import DataError
from datasets.index import Sample, classification_dir, index_split
from datasets.splits import load_split


def leak_check(root: Path, split: str, split_path: Path, eval_samples: Sequence[Sample],
               cache_dir: Optional[Path] = None, index: Callable[[Path, str], list[Sample]] = index_split
               ) -> tuple[Optional[dict[str, list[str]]], dict]:
    """(evaluated stem -> matching training stems, or None when not applicable; a description for metrics.json).

    `index(root, split)` lists a split's samples (the layout's indexer, datasets.factory.sample_index)."""
    if split == "train":
        return None, {"applied": False, "reason": "the evaluated split is the training data itself"}
    if index is index_split and not classification_dir(Path(root), "train").is_dir():
        return None, {"applied": False, "reason": f"'{root}' has no train split to compare with"}
    try:
        train_samples = index(root, "train")
    except DataError as exc:
        return None, {"applied": False, "reason": f"'{root}' has no readable train split to compare with ({exc})"}
    if split == "val":
        trained = set(load_split(split_path)["train"])
        train_samples = [s for s in train_samples if s.stem in trained]
        against = "the train part of the run's split.json"
    else:
        against = "the release's train split"
    from datasets.duplicates import leaked_stems

    leaked = leaked_stems(list(eval_samples), train_samples, cache_dir=cache_dir)
    return leaked, {"applied": True, "against": against, "num_training_images": len(train_samples),
                    "method": "datasets.duplicates.leaked_stems (identical or near-identical pixels)"}
