"""Checkpoints: atomic writes, safe loading (`weights_only=True`) and clear architecture checks.

A checkpoint is a plain dict:
    format_version, model_name, config (dict), model (state dict), ema (state dict or None),
    optimizer, scheduler, scaler (state dicts or None), epoch (completed epochs), best_metric, best_epoch,
    rng (python / numpy / torch / cuda states), num_params
"""
from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn as nn

from utils.config import Config, ConfigError, config_from_dict
from utils.disk import disk_full_as_error, ensure_free_space
from utils.errors import UserError
from utils.runs import fsync_file, replace_durably

FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: what torch.save will write, give or take its index."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(obj: Any) -> int:
    """An upper estimate of a checkpoint's file size (tensors plus zip and pickle overhead)."""
    return int(tensor_bytes(obj) * 1.02) + (256 << 10)


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename, fsync the folder: a crash or a power
    cut leaves the previous file or the new one, never an empty or half-written one.

    The free space is checked first; a disk that fills up during the write raises `DiskFullError` naming the
    path and the space needed (the previous file at `path` is untouched and the temporary file removed)."""
    path = Path(path)
    needed = checkpoint_bytes(obj)
    free = ensure_free_space(path, needed, "checkpoint")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with disk_full_as_error(path, needed, "checkpoint", free):
            with open(tmp, "wb") as handle:
                torch.save(obj, handle)
                fsync_file(handle)
            replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def capture_rng_state() -> dict:
    """RNG states as types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Load a checkpoint file safely, with an error that names the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder; expected a checkpoint file such as "
                              f"{path / 'best.pth'} or {path / 'last.pth'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    _check_torch_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(exc).__name__}: {first_line})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"'{path}' is not an EfficientMTNet framework checkpoint (no 'model'/'config' entries)")
    return ckpt


def _check_torch_file(path: Path) -> None:
    """Refuse a file that is neither torch.save's zip archive nor a legacy pickle, before torch.load fails on
    it with an unrelated message (a text file gives "pop from empty list")."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # zip (torch >= 1.6) or pickle protocol >= 2
        return
    if head.startswith(b"PK"):  # a zip whose end (the central directory) is missing: an interrupted copy or save
        raise CheckpointError(f"checkpoint '{path}' is not a complete torch.save archive (truncated: "
                              f"{path.stat().st_size} bytes); pass the best.pth or last.pth of a finished save")
    what = "an empty file" if not head else f"{path.stat().st_size} bytes starting with {head!r}"
    raise CheckpointError(f"'{path}' is not a PyTorch checkpoint ({what}, not a torch.save archive); pass the "
                          "best.pth or last.pth that train.py wrote in the run directory")


def resolve_checkpoint_arg(path: Union[str, Path]) -> Path:
    """A `--checkpoint` argument: a file as it is, or a run folder's best.pth (saying so)."""
    path = Path(path)
    if path.is_dir():
        best = path / "best.pth"
        if not best.is_file():
            raise CheckpointError(f"--checkpoint '{path}' is a folder without best.pth; expected a checkpoint file "
                                  "(best.pth or last.pth of a run)")
        print(f"--checkpoint {path} is a run folder: using {best}")
        return best
    return path


def config_of(ckpt: dict, path: Union[str, Path] = "<checkpoint>") -> Config:
    try:
        return config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"the config stored in '{path}' does not fit this version: {exc}") from exc
