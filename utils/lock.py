"""One process at a time in a run directory: a lock file `<run>/.lock` naming its owner.

    with run_lock(run_dir, "training"):     # RunLockedError if another live process holds it
        ...

The lock is an exclusive `flock` on `<run>/.lock`, so the kernel releases it when its owner dies, however it
dies (SIGKILL, power cut of a node): a lock is never left stuck. The file also holds the owner's pid, host,
purpose and start time, which the refusal quotes. A file left behind by a process that is no longer running
on this host is a stale lock: it is taken over with a one-line notice. A file whose owner lives on another host
(a shared file system without working locks) cannot be checked from here: it is refused, naming the file to
delete once that process is known to be gone.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from utils.errors import UserError

LOCK_NAME = ".lock"


class RunLockedError(UserError, RuntimeError):
    """Another process works in this run directory."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_owner(path: Path) -> Optional[dict]:
    """The owner recorded in a lock file (None: absent, empty or unreadable)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and "pid" in owner else None


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"{owner.get('purpose', 'a process')} (pid {owner['pid']} on host {owner.get('host', '?')}, since {started})"


class RunLock:
    """An exclusive lock on a run directory; a context manager (`run_lock`) or `acquire()` / `release()`."""

    def __init__(self, run_dir: Union[str, Path], purpose: str, hint: str = "") -> None:
        self.run_dir, self.purpose, self.hint = Path(run_dir), purpose, hint
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        for _ in range(10):  # retried only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(read_owner(self.path)) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False  # the previous owner removed it as we opened it
            if same_file:
                break
            os.close(fd)
        else:
            raise RunLockedError(f"could not take the lock '{self.path}' (it keeps being replaced)")
        try:
            self._check_previous(read_owner(self.path))
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                     "started": time.time(), "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _check_previous(self, owner: Optional[dict]) -> None:
        """The lock is ours (flock); a file that still names another owner was left by a dead process."""
        if owner is None or owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
            return
        if owner.get("host") != socket.gethostname():
            raise self._refusal(owner, foreign=True)
        gone = ("is no longer running" if not pid_alive(int(owner["pid"]))
                else "no longer holds it (that pid now belongs to another process)")
        print(f"notice: took over the stale lock of {_describe(owner)} in {self.run_dir}: that process {gone}",
              file=sys.stderr)

    def _refusal(self, owner: Optional[dict], foreign: bool = False) -> RunLockedError:
        who = _describe(owner) if owner else "another process"
        if foreign:
            return RunLockedError(
                f"run directory '{self.run_dir}' is locked by {who}, which cannot be checked from this host; if "
                f"no process of that run is still running there, delete '{self.path}' and try again")
        hint = f"; {self.hint}" if self.hint else ""
        return RunLockedError(f"run directory '{self.run_dir}' is in use by {who}: wait for it to finish or stop "
                              f"it, then run this again ({self.purpose} refused so that their files are not "
                              f"interleaved){hint}")

    def release(self) -> None:
        """Remove the lock file, then drop the flock (a process that opened the old file retries: see acquire)."""
        if self._fd is None:
            return
        try:
            owner = read_owner(self.path)
            if owner is not None and owner["pid"] == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextmanager
def run_lock(run_dir: Union[str, Path], purpose: str, hint: str = "") -> Iterator[RunLock]:
    """Hold the run directory's lock for the block; `RunLockedError` (one line, naming the owner) if taken.
    `hint`: what the refused command may do instead (e.g. "or pass --out DIR to write elsewhere")."""
    lock = RunLock(run_dir, purpose, hint).acquire()
    try:
        yield lock
    finally:
        lock.release()


def lock_holder(run_dir: Union[str, Path]) -> Optional[dict]:
    """The owner of the run's lock if a live process holds it now, else None (takes nothing)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_owner(path) or {"pid": -1, "host": "?", "purpose": "another process"}
    finally:
        os.close(fd)  # releases the shared probe if it was taken
    return None
