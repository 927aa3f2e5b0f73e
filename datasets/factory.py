"""Datasets from a `DataConfig`: the data root (generated when synthetic), the train/val split, the test split."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Callable, Optional

from utils.config import DataConfig

from .brisc import BriscDataset
from .duplicates import find_groups
from .errors import GET_DATA_HINT, DataError
from .imagefolder import index_imagefolder
from .index import Sample, index_split
from .pairs import index_pairs
from .splits import carve_dev_test, fold_split, load_split, make_split, save_split

EVAL_SPLITS = ("train", "val", "dev_test", "test")


def sample_index(data_cfg: DataConfig) -> Callable[[Path, str], list[Sample]]:
    """`index(root, split)` for the layout `data.format` names (brisc, imagefolder or pairs)."""
    layout = data_cfg.layout
    if data_cfg.format == "imagefolder":
        return functools.partial(index_imagefolder, train_dir=layout.train_dir, test_dir=layout.test_dir,
                                 extra_map=layout.class_map)
    if data_cfg.format == "pairs":
        return functools.partial(index_pairs, mask_suffix=layout.mask_suffix, mask_threshold=layout.mask_threshold,
                                 test_fraction=layout.test_fraction, seed=data_cfg.split.seed)
    return index_split


def ensure_data_root(data_cfg: DataConfig) -> Path:
    """The dataset root; generated once (atomically) when it is missing and `data.generated.enabled` is true."""
    root = Path(data_cfg.root)
    if root.is_dir():
        return root
    if root.exists():
        raise DataError(f"data.root '{root}' exists but is not a folder")
    if not data_cfg.generated.enabled:
        raise DataError(f"data.root '{root}' does not exist (set data.generated.enabled=true to generate demo data "
                        f"there).\n{GET_DATA_HINT}")
    from .synthetic import generate  # imported here so `python -m datasets.synthetic` runs without a warning

    try:
        if data_cfg.format != "brisc":  # a fake copy of the other layout
            from .synthetic_layouts import generate_layout

            generate_layout(root, data_cfg.format, data_cfg.generated.train, data_cfg.generated.test,
                            data_cfg.generated.seed)
            return root
        generate(root, data_cfg.generated.train, data_cfg.generated.test, data_cfg.generated.seed,
                 train_duplicates=data_cfg.generated.train_duplicates, leaks=data_cfg.generated.leaks)
    except FileExistsError:
        pass  # another process generated it meanwhile: the rename is atomic, so it is complete
    return root


def _dataset(data_cfg: DataConfig, root: Path, split: str, name: str, train: bool = False,
             stems: Optional[list[str]] = None, verbose: bool = True,
             index: Optional[Callable[[Path, str], list[Sample]]] = None) -> BriscDataset:
    prep = data_cfg.preprocess
    return BriscDataset(
        root,
        split,
        image_size=prep.image_size,
        train=train,
        in_channels=prep.in_channels,
        stems=stems,
        augment=data_cfg.augment,
        mean=prep.mean,
        std=prep.std,
        cache=data_cfg.loader.cache,
        cache_dir=data_cfg.loader.cache_dir,
        verbose=verbose,
        name=name,
        resize=prep.resize,
        head_margin=prep.head_margin,
        intensity_norm=prep.intensity_norm,
        percentile_range=prep.percentile_range,
        index=index or sample_index(data_cfg),
    )


def _resolve_split(data_cfg: DataConfig, root: Path, split_path: Path) -> dict:
    """The run's split: `split_path` if it exists (resume, test.py), else `data.split.file` copied there,
    else a new stratified split of the train folder saved there (fold `data.split.fold` of `data.split.folds` when set),
    with duplicate groups (or, with `data.split.groups: scan`, scan groups: similarity chains at
    `data.split.group_threshold`) kept on one side when `data.split.group_duplicates`, and a held-out `dev_test` part carved
    from the train part when `data.split.test_dev_fraction` > 0 (the validation part is the same with or without it)."""
    if split_path.is_file():
        return load_split(split_path)
    if data_cfg.split.file:
        split = load_split(data_cfg.split.file)
        split_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_cfg.split.file, split_path)
        return split
    samples = sample_index(data_cfg)(root, "train")
    stems, labels = [s.stem for s in samples], [s.label for s in samples]
    groups = None
    scan = data_cfg.split.groups == "scan"
    threshold = data_cfg.split.group_threshold if scan else data_cfg.split.near_threshold
    if data_cfg.split.group_duplicates:
        groups = [g.stems for g in find_groups(samples, threshold, cache_dir=data_cfg.loader.cache_dir)]
    held_out: list[str] = []
    if data_cfg.split.folds and data_cfg.split.test_dev_fraction > 0:  # cross-validation: dev_test first, folds of the rest
        held_out = carve_dev_test({"train": stems, "val": []}, stems, labels, data_cfg.split.test_dev_fraction,
                                  data_cfg.split.seed, groups)["dev_test"]
        rest = set(held_out)
        labels = [l for s, l in zip(stems, labels) if s not in rest]
        stems = [s for s in stems if s not in rest]
    if data_cfg.split.folds:
        split = fold_split(stems, labels, data_cfg.split.folds, data_cfg.split.fold, data_cfg.split.seed, groups)
    else:
        split = make_split(stems, labels, data_cfg.split.val_fraction, data_cfg.split.seed, groups)
    if groups is not None:
        split["near_threshold"] = data_cfg.split.near_threshold
        split["split_groups"] = data_cfg.split.groups
        if scan:
            split["group_threshold"] = data_cfg.split.group_threshold
    if held_out:
        split.update({"dev_test": held_out, "test_dev_fraction": float(data_cfg.split.test_dev_fraction)})
    elif data_cfg.split.test_dev_fraction > 0:  # carved from the train part: the validation part stays as it was
        split = carve_dev_test(split, stems, labels, data_cfg.split.test_dev_fraction, data_cfg.split.seed, groups)
    save_split(split, split_path)
    return split


def build_train_val(data_cfg: DataConfig, split_path: Path, verbose: bool = True) -> tuple[BriscDataset, BriscDataset]:
    """(train with augmentations, val) from the on-disk train folder and the run's split file."""
    root = ensure_data_root(data_cfg)
    split = _resolve_split(data_cfg, root, Path(split_path))
    if not split["val"]:
        raise DataError(f"split '{split_path}' has no validation images; use data.split.val_fraction > 0")
    train = _dataset(data_cfg, root, "train", "train", train=True, stems=split["train"], verbose=verbose)
    val = _dataset(data_cfg, root, "train", "val", stems=split["val"], verbose=verbose)
    return train, val


def build_eval_dataset(data_cfg: DataConfig, split: str, split_path: Optional[Path] = None,
                       verbose: bool = True, index: Optional[Callable[[Path, str], list[Sample]]] = None
                       ) -> BriscDataset:
    """An evaluation dataset (no augmentation): "test" is the on-disk test folder; "val" is the validation
    part of the split file; "dev_test" its held-out part (data.split.test_dev_fraction); "train" is its train part
    (the whole train folder without a split file).
    `index(root, split)` replaces the layout's indexer (another labelling of the same layout)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    root = ensure_data_root(data_cfg)
    if split == "test":
        return _dataset(data_cfg, root, "test", "test", verbose=verbose, index=index)
    if split_path is None or not Path(split_path).is_file():
        if split in ("val", "dev_test"):
            raise DataError(f"split '{split}' needs the run's split file (got {split_path}); it is written by "
                            "train.py")
        return _dataset(data_cfg, root, "train", "train", verbose=verbose, index=index)
    parts = load_split(split_path)
    if split not in parts:
        raise DataError(f"split file '{split_path}' has no '{split}' part: the run was trained with "
                        "data.split.test_dev_fraction 0; train with data.split.test_dev_fraction > 0 to hold one out")
    stems = parts[split]
    return _dataset(data_cfg, root, "train", split, stems=stems, verbose=verbose, index=index)
