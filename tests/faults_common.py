"""Small real training runs for the fault tests (tests/test_faults_*.py): generated data at 32 px."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers import REPO, run_entry


def train_opts(data_root: Path, work_dir: Path, epochs: int) -> list[str]:
    return [f"data.root={data_root}", "data.generated.enabled=true", "data.generated.train=24", "data.generated.test=8",
            "data.preprocess.image_size=32", "data.loader.num_workers=0", "data.loader.cache=none", "data.loader.batch_size=8",
            f"experiment.work_dir={work_dir}", f"train.epochs={epochs}", "train.image_log_every=0",
            "train.threads=1"]


def train_args(data_root: Path, work_dir: Path, epochs: int, *extra: str) -> list[str]:
    return ["train.py", "--config", "configs/demo.yaml", "--no-progress", *extra, "--opts",
            *train_opts(data_root, work_dir, epochs)]


def train(data_root: Path, work_dir: Path, epochs: int, *extra: str) -> subprocess.CompletedProcess:
    return run_entry(train_args(data_root, work_dir, epochs, *extra), cwd=REPO)


def entry_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The command failed as a user error: exit 2, no traceback, the last stderr line `error: ...`."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    return last


def mount_tmpfs(where: Path, size: str) -> bool:
    """Mount a real tmpfs of `size` at `where` (False where this machine does not allow it)."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def unmount(where: Path) -> None:
    """Lazy unmount: detached now even if a memory map in this process still refers to a file on it."""
    subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def tmpfs_volume(tmp_path: Path, size: str):
    """Fixture body: a real tmpfs of `size` at tmp_path/disk, unmounted afterwards; skips where mounting is
    not allowed."""
    import pytest

    where = tmp_path / "disk"
    if not mount_tmpfs(where, size):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    yield where
    unmount(where)

