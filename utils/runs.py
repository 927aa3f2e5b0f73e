"""Run directories: `<work_dir>/<experiment name>/<timestamp>/` with config, split, checkpoints, history, logs."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Union

from utils.disk import disk_full_as_error, ensure_free_space
from utils.errors import UserError

RUN_FILES = ("config.yaml", "split.json", "last.pth", "best.pth", "history.json", "history.csv", "train.log")


def new_run_dir(work_dir: Union[str, Path], name: str) -> Path:
    """A fresh, timestamped run directory (a suffix keeps two runs started in the same second apart).

    `latest` is not moved here: the trainer points it at the run once the run has really started
    (`point_latest`), so that a start that fails leaves `latest` on the previous run."""
    base = Path(work_dir) / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = base / stamp
    suffix = 1
    while run_dir.exists():
        run_dir = base / f"{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    return run_dir


def point_latest(run_dir: Path) -> None:
    """`<work_dir>/<name>/latest` points at `run_dir`, so commands can name the newest run without a timestamp."""
    base = run_dir.parent
    latest = base / "latest"
    tmp_link = base / f".latest.tmp{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(run_dir.name)
    os.replace(tmp_link, latest)


def replace_durably(tmp: Union[str, Path], path: Union[str, Path]) -> None:
    """Rename the finished, fsynced file `tmp` to `path`, then fsync the folder so that the rename itself
    survives a power cut (otherwise the folder entry may still point at the old file, or at nothing)."""
    os.replace(tmp, path)
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(handle) -> None:
    """Flush Python's buffer and the OS cache of an open file to the disk."""
    handle.flush()
    os.fsync(handle.fileno())


def write_text_atomic(text: str, path: Union[str, Path], what: str = "file") -> None:
    """Write `text` to a temporary file, fsync it, rename it over `path`: a crash leaves the old or the new
    file, and a full disk raises `DiskFullError` (naming the path and the space needed) with the old file intact
    and no temporary file left behind. The one writer behind every JSON/CSV/YAML file of a run."""
    path = Path(path)
    data = text.encode("utf-8")
    free = ensure_free_space(path, len(data), what)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with disk_full_as_error(path, len(data), what, free):
            with open(tmp, "wb") as handle:
                handle.write(data)
                fsync_file(handle)
            replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(obj: object, path: Union[str, Path]) -> None:
    """Write JSON atomically (see `write_text_atomic`): a crash leaves the old or the new file, never a part."""
    write_text_atomic(json.dumps(obj, indent=2), path, "JSON file")


def write_history(history: list[dict], run_dir: Path) -> None:
    """`history.json` (list of per-epoch dicts) and the same as `history.csv`."""
    write_json_atomic(history, run_dir / "history.json")
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(buffer.getvalue(), run_dir / "history.csv", "CSV file")


class RunFolderError(UserError):
    """A run directory with a missing, truncated or hand-edited file; the message says which and what to do."""


def read_json_file(path: Path, what: str, fix: str) -> object:
    """A run's JSON file, or `RunFolderError` naming it, what is wrong (truncated, not JSON) and `fix`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFolderError(f"run folder '{path.parent}' has no {path.name} ({what}); {fix}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        state = "empty" if not text.strip() else f"truncated or not valid JSON ({exc})"
        raise RunFolderError(f"{path} ({what}) is {state}; {fix}") from None


def read_history(run_dir: Path, required: bool = False) -> list[dict]:
    """The run's per-epoch history ([] when there is none yet and not `required`); a truncated or edited
    history.json is an error, never read as empty."""
    path = run_dir / "history.json"
    if not path.is_file() and not required:
        return []
    history = read_json_file(path, "the per-epoch history", "restore it from a backup, or from history.csv "
                             "which holds the same rows, then run the command again")
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise RunFolderError(f"{path} is not a list of per-epoch records (edited by hand?); restore it from a "
                             "backup or from history.csv, then run the command again")
    return history


def setup_logger(run_dir: Optional[Path], is_main: bool = True, name: str = "efficient_mtnet") -> logging.Logger:
    """Console + `train.log` logger on the main process; silent on other ranks."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run_dir is not None and is_main:
        file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)
    return logger
