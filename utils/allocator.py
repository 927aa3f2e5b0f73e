"""The process's CPU memory allocator: keep large freed buffers for reuse (glibc), applied by the entry points.

PyTorch's CPU allocator has no cache of its own: every CPU tensor is a malloc and a free. glibc serves a request
above its mmap threshold (which adapts, but never beyond 32 MiB on 64-bit) by a fresh mmap and unmaps it on
free, and it gives the top of its heap back to the system once more than 128 KiB there is free. So every
activation larger than 32 MiB (at 640x640 and batch 8 EfficientMTNet's stride-2 and stride-4 maps are 50-100
MiB) is new memory at every forward pass, and the kernel faults in and zeroes each 4 KiB page on first touch.
Measured with EfficientMTNet at 640x640, batch 8: 45,000-70,000 page faults and 80-140 ms of system time per
image, more than the computation itself (about 80 ms); with both thresholds at 1 GiB, none. At batch 1 (maps
under 32 MiB) nothing changes. The price: up to 1 GiB of freed memory stays with the process instead of going
back to the system (peak resident size at 640x640, batch 8: 1.41 GiB instead of 1.16).

Called by the entry points that run a model over batches: train.py, test.py, benchmark.py (`--allocator
default` to compare), `python -m engine.cv` and `python -m evaluation.shift`. No torch import here, so an entry
point can call it first, before any tensor exists.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
KEEP_FREED_BYTES = 1 << 30  # mallopt takes a C int; 1 GiB is above any activation at batch 32 and 640 px
DEFAULT_STATE = "default"

_state = DEFAULT_STATE


def keep_freed_memory(threshold: int = KEEP_FREED_BYTES) -> str:
    """Raise glibc's mmap and trim thresholds to `threshold` bytes, so that freed buffers up to that size are
    reused by the next allocation instead of being unmapped and faulted in again.

    Does nothing off glibc (macOS, Windows, musl), under a preloaded allocator (jemalloc, tcmalloc: LD_PRELOAD),
    or when the user set glibc's MALLOC_* variables or malloc tunables, which then win. Idempotent. Returns the
    allocator state, as `allocator_state()` does afterwards.
    """
    global _state
    if _state != DEFAULT_STATE:
        return _state
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return _state
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:
        _state = f"preloaded: {preload}"
        return _state
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        _state = "glibc, MALLOC_* settings from the environment"
        return _state
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return _state
    # Both: a fixed mmap threshold alone leaves the trim threshold at 128 KiB, and the heap top is still given
    # back on free (measured: 14,000 faults per image instead of 48,000, against none with both).
    if mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1:
        _state = f"glibc, freed memory kept up to {threshold // 2**20} MiB"
    return _state


def allocator_state() -> str:
    """What `keep_freed_memory` did in this process: "default" when it was not called or changed nothing."""
    return _state
