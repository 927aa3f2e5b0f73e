"""Run directories: `<work_dir>/<experiment name>/<timestamp>/` with config, split, checkpoints, history, logs."""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Union

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


def write_json_atomic(obj: object, path: Union[str, Path]) -> None:
    """Write JSON to a temporary file, fsync it, rename it over `path`: a crash leaves the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2)
        fsync_file(handle)
    replace_durably(tmp, path)


def write_history(history: list[dict], run_dir: Path) -> None:
    """`history.json` (list of per-epoch dicts) and the same as `history.csv`."""
    write_json_atomic(history, run_dir / "history.json")
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    tmp = run_dir / f".history.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        fsync_file(handle)
    replace_durably(tmp, run_dir / "history.csv")


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.json"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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
