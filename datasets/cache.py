"""Decode once: the resized uint8 image and mask of every sample, kept in RAM or in one `.npy` file.

Each sample is one row of a (N, S*S + S*S/8) uint8 array: the greyscale image followed by the 0/255 mask
packed to bits. The array is filled in the main process (a thread pool decodes; OpenCV releases the GIL)
before any DataLoader worker starts, so workers only read it:

- `ram`: a shared-memory tensor; forked workers see it without a copy, spawned workers receive a handle.
- `disk`: `<cache_dir>/<split>_<size>px_<n>_<key>.cache`, opened as a read-only memory map in each worker.
  The key hashes the stems, labels, sizes and modification times (ns) of the image and mask files, each
  mask's threshold, the decode settings (`decode_settings`: image size, resize mode, head margin; not the root path) and
  the format version: an image edited in place, or another decoding, gets a new cache file.

The disk file is crash-safe and self-describing (format version 3):

    bytes 0-7      magic b"EMTCACHE"
    bytes 8-11     length L of the JSON header (uint32, little-endian)
    bytes 12-12+L  header: format_version, key, settings, shape, payload_bytes, crc32 of the payload
    byte 4096-     payload: the rows, uint8

It is written under a temporary name (space reserved up front, so a full disk is an error, not a SIGBUS in
the middle of the memory map), fsynced, the header written last, then renamed. On open the header must
match (version, key, settings, shape), the file length must be exact and, once per process that builds the
dataset, the payload's CRC32 must match: a partial, corrupt or stale file is rebuilt with a one-line notice,
never read. Temporary files of killed writers (on this host, pid gone) are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from utils.disk import disk_full_as_error, ensure_free_space
from utils.lock import pid_alive
from utils.runs import fsync_file, replace_durably

from .decode import load_sample
from .errors import DataError
from .geometry import DEFAULT_HEAD_MARGIN, HEAD_VERSION
from .index import Sample

CACHE_MODES = ("none", "ram", "disk")
_FORMAT_VERSION = 3  # bump when the row layout, the file layout or the decoding code changes
MAGIC = b"EMTCACHE"
HEADER_BYTES = 4096  # the payload starts here (page-aligned for the memory map)
_CHUNK = 8 << 20


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

    `resize` and `settings` (any further decode setting, e.g. {"crop": "head"}): what, beyond the image size,
    shapes the decoded arrays; all of it is part of the disk key and header (see `decode_settings`).
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
        settings: Optional[dict] = None,
    ) -> None:
        if mode not in ("ram", "disk"):
            raise ValueError(f"cache mode must be 'ram' or 'disk' here, got {mode!r}")
        self.size, self.mode, self.verbose, self.resize = size, mode, verbose, resize
        self.head_margin = head_margin
        self.path: Optional[Path] = None
        self._rows: Optional[Union[np.ndarray, torch.Tensor]] = None
        shape = self._shape = (len(samples), _row_width(size))
        if mode == "ram":
            rows = torch.empty(shape, dtype=torch.uint8).share_memory_()
            self._fill(samples, rows.numpy())
            self._rows = rows
        else:
            if cache_dir is None:
                raise ValueError("cache='disk' needs a cache_dir")
            self.settings = decode_settings(size, {**geometry_settings(resize, head_margin), **(settings or {})})
            self.key = cache_key(samples, self.settings)
            self.path = Path(cache_dir) / f"{split}_{size}px_{len(samples)}_{self.key}.cache"
            self._remove_orphans()
            problem = self._problem(shape, verify=True)
            if problem is None:
                if verbose:
                    print(f"[data] using disk cache {self.path}")
            else:
                if problem != "absent":
                    print(f"[data] disk cache {self.path} is {problem}: rebuilding it", file=sys.stderr)
                self._write(samples, shape)

    def _header(self, shape: tuple[int, int], crc: int) -> dict:
        return {"format_version": _FORMAT_VERSION, "key": self.key, "settings": self.settings,
                "shape": list(shape), "payload_bytes": shape[0] * shape[1], "crc32": crc}

    def _problem(self, shape: tuple[int, int], verify: bool) -> Optional[str]:
        """Why the file at `self.path` must not be read ("absent", "truncated", ...), or None if it is sound.
        `verify`: also check the payload's CRC32 (reads the whole file once)."""
        if not self.path.is_file():
            return "absent"
        header = read_header(self.path)
        if header is None:
            return "not a finished cache file (no valid header)"
        expected = self._header(shape, header.get("crc32", 0))
        for field in ("format_version", "settings", "shape", "key"):  # the most telling difference first
            if header.get(field) != expected[field]:
                return f"stale (its {field} is {header.get(field)!r}, this run needs {expected[field]!r})"
        size = self.path.stat().st_size
        if size != HEADER_BYTES + expected["payload_bytes"]:
            return f"truncated or padded ({size} bytes, expected {HEADER_BYTES + expected['payload_bytes']})"
        if verify and payload_crc32(self.path, expected["payload_bytes"]) != header["crc32"]:
            return "corrupt (its checksum does not match its content)"
        return None

    def _remove_orphans(self) -> None:
        """Temporary files of writers on this host that were killed (their pid is gone): disk space back."""
        host = socket.gethostname()
        for tmp in self.path.parent.glob(".*.tmp") if self.path.parent.is_dir() else []:
            parts = tmp.name.rsplit(".", 3)  # .<name>.<host>.<pid>.tmp
            if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not pid_alive(int(parts[2])):
                tmp.unlink(missing_ok=True)
                print(f"[data] removed {tmp}, left by a cache writer that was killed", file=sys.stderr)

    def _write(self, samples: list[Sample], shape: tuple[int, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        total = HEADER_BYTES + shape[0] * shape[1]
        free = ensure_free_space(self.path, total, "disk cache")
        tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            with disk_full_as_error(self.path, total, "disk cache", free):
                with open(tmp, "wb+") as handle:
                    _reserve(handle.fileno(), total)  # ENOSPC now, not SIGBUS while the memory map fills
                    rows = np.memmap(handle, dtype=np.uint8, mode="r+", offset=HEADER_BYTES, shape=shape)
                    self._fill(samples, rows)
                    rows.flush()
                    del rows
                    crc = payload_crc32(tmp, shape[0] * shape[1])
                    handle.seek(0)
                    handle.write(encode_header(self._header(shape, crc)))  # last: only a full file has one
                    fsync_file(handle)
                replace_durably(tmp, self.path)
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
        if self._rows is None:  # disk mode: opened lazily, once per process (checked in full by the builder)
            shape = self._shape
            problem = self._problem(shape, verify=False)
            if problem is not None:
                raise DataError(f"disk cache {self.path} is {problem} (changed while this run uses it?); "
                                   "run again to rebuild it")
            self._rows = np.memmap(self.path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=shape)
        return self._rows

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = self._array()[i]
        return unpack(row.numpy() if isinstance(row, torch.Tensor) else row, self.size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.mode == "disk":
            state["_rows"] = None  # a memory map must not be pickled (it would copy the whole file)
        return state


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's blocks now (posix_fallocate), where the file system supports it."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: no fallocate here; the size is set below
            raise
    os.ftruncate(fd, nbytes)


def encode_header(header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    block = MAGIC + struct.pack("<I", len(body)) + body
    if len(block) > HEADER_BYTES:
        raise ValueError(f"cache header of {len(block)} bytes does not fit in {HEADER_BYTES}")
    return block.ljust(HEADER_BYTES, b"\0")


def read_header(path: Path) -> Optional[dict]:
    """The header of a cache file, or None when the file is not a finished cache file of this format."""
    try:
        with open(path, "rb") as handle:
            block = handle.read(HEADER_BYTES)
    except OSError:
        return None
    if len(block) < len(MAGIC) + 4 or not block.startswith(MAGIC):
        return None
    (length,) = struct.unpack("<I", block[len(MAGIC):len(MAGIC) + 4])
    try:
        header = json.loads(block[len(MAGIC) + 4:len(MAGIC) + 4 + length])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def payload_crc32(path: Path, nbytes: int) -> int:
    crc = 0
    with open(path, "rb") as handle:
        handle.seek(HEADER_BYTES)
        left = nbytes
        while left > 0:
            chunk = handle.read(min(_CHUNK, left))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc
