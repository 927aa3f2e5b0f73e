"""BRISC 2025 data: indexing, decoding, transforms, caching, grouped splits and folds, duplicate search, a
source-confound audit and a synthetic BRISC-layout generator."""
from .brisc import BriscDataset
from .errors import DataError
from .factory import build_eval_dataset, build_train_val, ensure_data_root
from .naming import CLASS_NAMES, parse_name
from .splits import fold_split, load_split, make_folds, make_split, save_split

__all__ = [
    "CLASS_NAMES",
    "BriscDataset",
    "DataError",
    "build_eval_dataset",
    "build_train_val",
    "ensure_data_root",
    "fold_split",
    "load_split",
    "make_folds",
    "make_split",
    "parse_name",
    "save_split",
]
