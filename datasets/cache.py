"""Decode once: the resized uint8 image and mask of every sample, kept in RAM or in one `.npy` file.

Each sample is one row of a (N, S*S + S*S/8) uint8 array: the greyscale image followed by the 0/255 mask
packed to bits. The array is filled in the main process (a thread pool decodes; OpenCV releases the GIL)
before any DataLoader worker starts, so workers only read it:

- `ram`: a shared-memory tensor; forked workers see it without a copy, spawned workers receive a handle.
- `disk`: `<cache_dir>/<split>_<size>px_<n>_<key>.npy`, opened as a read-only memory map in each worker.
  It is written to a temporary file and renamed, so an interrupted fill never leaves a broken cache.
  The key hashes the stems, labels, sizes and modification times (ns) of the image and mask files and the
  decode settings (image size, resize mode, head margin; not the root path): an image edited in place, or another
  decoding, gets a new cache file.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .decode import load_sample
from .geometry import DEFAULT_HEAD_MARGIN, HEAD_VERSION
from .index import Sample

CACHE_MODES = ("none", "ram", "disk")
_FORMAT_VERSION = 2  # bump when the row layout or the decoding code changes


def _row_width(size: int) -> int:
    return size * size + (size * size + 7) // 8


def pack(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One cache row from a (S, S) uint8 image and a (S, S) 0/255 mask."""
    return np.concatenate([image.reshape(-1), np.packbits(mask.reshape(-1) > 0)])


def unpack(row: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    pixels = size * size
    image = np.array(row[:pixels]).reshape(size, size)  # a copy: transforms must never write into the cache
    mask = np.unpackbits(np.asarray(row[pixels:]), count=pixels).reshape(size, size) * np.uint8(255)
    return image, mask


def decode_settings(size: int, extra: Optional[dict] = None) -> dict:
    """Every setting that changes the decoded arrays (the one place to add a new one): part of the cache key."""
    return {"image_size": int(size), **(extra or {})}


def geometry_settings(resize: str, head_margin: float) -> dict:
    """The placement settings in a cache key: the head's margin and detector version only matter for head."""
    if resize != "head":
        return {"resize": resize}
    return {"resize": resize, "head_margin": float(head_margin), "head_version": HEAD_VERSION}


def _file_stamp(path: Optional[Path]) -> list[int]:
    if path is None:
        return [-1, -1]
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def cache_key(samples: list[Sample], settings: dict) -> str:
    """Identifies the decoded content: name, label, size and mtime of every image and mask, and the decode
    settings (`decode_settings`)."""
    entries = [(s.stem, s.label, *_file_stamp(s.image), *_file_stamp(s.mask), s.mask_threshold) for s in samples]
    payload = json.dumps([_FORMAT_VERSION, sorted(settings.items()), entries]).encode()
    return hashlib.sha1(payload).hexdigest()[:16]


class ArrayCache:
    """Rows of decoded samples, addressed by the sample's position in `samples`.

    `decode`: decode settings beyond the image size (e.g. how images are resized), covered by the disk key.
    """

    def __init__(
        self,
        samples: list[Sample],
        size: int,
        mode: str,
        cache_dir: Optional[Union[str, Path]] = None,
        split: str = "data",
        verbose: bool = True,
        resize: str = "stretch",
        head_margin: float = DEFAULT_HEAD_MARGIN,
    ) -> None:
        if mode not in ("ram", "disk"):
            raise ValueError(f"cache mode must be 'ram' or 'disk' here, got {mode!r}")
        self.size, self.mode, self.verbose, self.resize = size, mode, verbose, resize
        self.head_margin = head_margin
        self.path: Optional[Path] = None
        self._rows: Optional[Union[np.ndarray, torch.Tensor]] = None
        shape = (len(samples), _row_width(size))
        if mode == "ram":
            rows = torch.empty(shape, dtype=torch.uint8).share_memory_()
            self._fill(samples, rows.numpy())
            self._rows = rows
        else:
            if cache_dir is None:
                raise ValueError("cache='disk' needs a cache_dir")
            key = cache_key(samples, decode_settings(size, geometry_settings(resize, head_margin)))
            self.path = Path(cache_dir) / f"{split}_{size}px_{len(samples)}_{key}.npy"
            if not self._usable(shape):
                self._write(samples, shape)
            elif verbose:
                print(f"[data] using disk cache {self.path}")

    def _usable(self, shape: tuple[int, int]) -> bool:
        if not self.path.is_file():
            return False
        try:
            return np.load(self.path, mmap_mode="r").shape == shape
        except (ValueError, OSError):
            return False  # truncated or foreign file: rebuild it

    def _write(self, samples: list[Sample], shape: tuple[int, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.stem}.{os.getpid()}.tmp.npy")
        try:
            rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            self._fill(samples, rows)
            rows.flush()
            del rows
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        if self.verbose:
            print(f"[data] wrote disk cache {self.path} ({self.path.stat().st_size / 2**20:.0f} MiB)")

    def _fill(self, samples: list[Sample], rows: np.ndarray) -> None:
        start = time.perf_counter()

        def fill_one(i: int) -> None:
            rows[i] = pack(*load_sample(samples[i], self.size, self.resize, self.head_margin))

        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill_one, range(len(samples))))  # list() re-raises the first error, naming the file
        if self.verbose:
            print(f"[data] decoded {len(samples)} images at {self.size}px in {time.perf_counter() - start:.1f} s")

    def _array(self) -> Union[np.ndarray, torch.Tensor]:
        if self._rows is None:  # disk mode: opened lazily, once per process
            self._rows = np.load(self.path, mmap_mode="r")
        return self._rows

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = self._array()[i]
        return unpack(row.numpy() if isinstance(row, torch.Tensor) else row, self.size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.mode == "disk":
            state["_rows"] = None  # a memory map must not be pickled (it would copy the whole file)
        return state
