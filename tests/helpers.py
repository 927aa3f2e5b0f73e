"""Paths and a runner for the entry points, shared by the end-to-end tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_BRISC = REPO.parent / "shared" / "data" / "brisc2025"


def run_entry(args: list[str], cwd: Path, timeout: int = 300, env_extra: dict | None = None
              ) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository with a small thread count; returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def copy_test_images(root: Path, folder: Path, class_name: str = "glioma", count: int = 2) -> Path:
    """`count` test images of one class of a BRISC-layout `root`, copied into a new `folder` (for --input)."""
    folder.mkdir()
    for image in sorted((root / "classification_task" / "test" / class_name).glob("*.jpg"))[:count]:
        (folder / image.name).write_bytes(image.read_bytes())
    return folder
