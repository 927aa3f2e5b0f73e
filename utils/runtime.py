"""Device selection, seeding, mixed precision and DataLoader worker set-up."""
from __future__ import annotations

import contextlib
import os
import random
import signal
from typing import ContextManager, Optional

import numpy as np
import torch

from utils.config import ConfigError, EvalConfig, TrainConfig


def select_device(name: str = "auto", local_rank: int = 0, key: str = "train.device") -> torch.device:
    """`auto` picks CUDA when present (the local rank's GPU under torchrun), else the CPU. A device that this
    machine does not have is a `ConfigError` naming `key` (the config key or command-line option)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={name!r} but no CUDA GPU is visible on this machine; use {key}=cpu or auto")
        if name == "cuda":
            return torch.device("cuda", local_rank)
        index = torch.device(name).index
        if index is not None and index >= count:
            raise ConfigError(f"{key}={name!r} but this machine has {count} CUDA GPU(s) (cuda:0 to "
                              f"cuda:{count - 1}); use {key}=cuda or auto")
    elif name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}='mps' but no Apple GPU is available; use {key}=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also ask cuDNN/torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed Python and NumPy from the worker's torch seed (which the loader derives
    from its generator; the augmentation pipeline follows that seed by itself).

    Workers also ignore SIGINT: Ctrl-C reaches the whole process group, and the main process alone handles it
    (otherwise every worker prints a KeyboardInterrupt traceback and the loader reports a dead worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def reseed_augmentations(dataset: object, seed: int) -> None:
    """Restart the dataset's augmentation stream (used when the loader runs in the main process)."""
    while dataset is not None and hasattr(dataset, "dataset"):  # torch Subset and similar wrappers
        dataset = dataset.dataset
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def amp_dtype(train_cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for this run, or None when mixed precision is off."""
    mode = train_cfg.amp
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "none"
    if mode == "none":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; on a CPU use train.amp=bf16 or none")
    return torch.float16 if mode == "fp16" else torch.bfloat16


def eval_dtype(eval_cfg: EvalConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for validation and test.py (`eval.precision`), the same for both; None for fp32."""
    if eval_cfg.precision == "fp32":
        return None
    if eval_cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("eval.precision=fp16 needs a CUDA device; on a CPU use eval.precision=bf16 or fp32")
    return torch.float16 if eval_cfg.precision == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
