"""Calibration images for static INT8 quantisation (`model.runtime.load_predictor(..., precision="int8-static")`):
a seeded sample of the run's training split (the train part of the `split.json` beside the checkpoint), with
the evaluation transform of that run (no augmentation), never a validation or test image.

    from datasets.calibration import TrainCalibration
    predictor = load_predictor(ckpt, "onnxruntime", precision="int8-static", calibration=TrainCalibration(ckpt))

The images are read only when an export needs them; `key` (split file hash, sample size, seed, preprocessing)
names them in the export cache key, so another sample re-quantises.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from utils.checkpoint import config_of, read_checkpoint

from .errors import DataError
from .factory import build_eval_dataset

DEFAULT_COUNT = 256


class TrainCalibration:
    """`count` images of the checkpoint's training split in batches of `batch_size` (iterate it), drawn with
    `seed`; `data_root` replaces the data.root stored in the checkpoint's config (data moved)."""

    def __init__(self, checkpoint: Union[str, Path], count: int = DEFAULT_COUNT, batch_size: int = 16,
                 seed: int = 0, data_root: Optional[Union[str, Path]] = None) -> None:
        if count < 1 or batch_size < 1:
            raise DataError(f"calibration needs count >= 1 and batch_size >= 1 (got {count}, {batch_size})")
        checkpoint = Path(checkpoint)
        self.cfg = config_of(read_checkpoint(checkpoint), checkpoint)
        if data_root is not None:
            self.cfg.data.root = str(data_root)
        self.split_path = checkpoint.parent / "split.json"
        if not self.split_path.is_file():
            raise DataError(f"calibration needs the run's split file '{self.split_path}' (written by train.py) "
                            "to draw training images; it is missing")
        self.count, self.batch_size, self.seed = count, batch_size, seed
        preprocessing = {**dataclasses.asdict(self.cfg.data.preprocess), "root": self.cfg.data.root}
        digest = hashlib.sha256(self.split_path.read_bytes())
        digest.update(json.dumps([count, seed, preprocessing], sort_keys=True, default=str).encode())
        self.key = f"train-split sample of {count}, seed {seed}, {digest.hexdigest()[:16]}"

    def __iter__(self) -> Iterator[torch.Tensor]:
        dataset = build_eval_dataset(self.cfg.data, "train", self.split_path, verbose=False)
        if len(dataset) == 0:
            raise DataError(f"the train part of '{self.split_path}' holds no images to calibrate on")
        order = np.random.default_rng(self.seed).permutation(len(dataset))[:self.count]
        for start in range(0, len(order), self.batch_size):
            yield torch.stack([dataset[int(i)]["image"] for i in order[start:start + self.batch_size]])
