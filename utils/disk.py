"""Free disk space: a check before a large write, and one clear error when the disk fills up anyway.

    ensure_free_space(path, nbytes, "checkpoint")   # before writing nbytes to path (DiskFullError if short)
    with disk_full_as_error(path, nbytes): ...      # ENOSPC (or torch.save's RuntimeError on a full disk)
                                                    # inside the block becomes DiskFullError

A `DiskFullError` is a `UserError`: entry points print it as one line `error: ...` (exit 2) naming the path,
the space it needed and the space that was free. The writers that use these (atomic checkpoint, JSON and cache
writes) write to a temporary file and rename, so the previous file is still intact when this is raised.
"""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from utils.errors import UserError

# Kept free beyond the file itself: logs, TensorBoard events and the file system's own bookkeeping.
MARGIN_BYTES = 1 << 20


class DiskFullError(UserError, OSError):
    """Not enough free space for a write; the message names the path, what it needed and what was free."""


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # unreachable: the loop returns at GiB


def free_bytes(path: Union[str, Path]) -> int:
    """Free bytes on the file system that holds `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full_error(path: Union[str, Path], nbytes: int, what: str = "file", free: Optional[int] = None
                    ) -> DiskFullError:
    """The error for `nbytes` that did not fit; `free`: the free space before the write (default: now)."""
    free = free_bytes(Path(path).parent) if free is None else free
    shortage = (f"not enough disk space to write the {what} '{path}': it needs {human_bytes(nbytes)}, "
                f"{human_bytes(free)} free on that disk")
    error = DiskFullError(f"{shortage}; free some space (the previous file is intact) and run the command again")
    error.errno, error.shortage = errno.ENOSPC, shortage  # `shortage`: the message without what to do
    return error


def ensure_free_space(path: Union[str, Path], nbytes: int, what: str = "file") -> int:
    """Raise `DiskFullError` unless `nbytes` (plus a small margin) fit on the disk of `path`; returns the free
    bytes (for the message, should the write fail all the same)."""
    free = free_bytes(Path(path).parent)
    if free < nbytes + MARGIN_BYTES:
        raise disk_full_error(path, nbytes, what, free)
    return free


def is_disk_full(exc: BaseException, path: Union[str, Path], nbytes: int) -> bool:
    """Whether `exc`, raised while writing `nbytes` to `path`, means the disk is full. torch.save reports a
    full disk as a RuntimeError from its zip writer ("unexpected pos ..."), not as ENOSPC: it counts as full
    when the free space is now below what the write needed."""
    if isinstance(exc, DiskFullError):
        return False  # already the clear error
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, (RuntimeError, OSError)) and free_bytes(Path(path).parent) < nbytes + MARGIN_BYTES


@contextmanager
def disk_full_as_error(path: Union[str, Path], nbytes: int, what: str = "file", free: Optional[int] = None
                       ) -> Iterator[None]:
    """Inside the block, a write that fails because the disk filled up raises `DiskFullError` instead
    (`free`: the free space measured before the write, for the message)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc, path, nbytes):
            raise disk_full_error(path, nbytes, what, free) from exc
        raise
