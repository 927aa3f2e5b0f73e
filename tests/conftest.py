"""Shared fixtures: a tiny generated BRISC-layout dataset."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO, run_entry


@pytest.fixture(scope="session")
def tiny_brisc(tmp_path_factory) -> Path:
    """A generated BRISC-layout dataset: 48 train and 16 test classification images."""
    root = tmp_path_factory.mktemp("data") / "brisc"
    proc = run_entry(["-m", "datasets.synthetic", "--out", str(root), "--train", "48", "--test", "16", "--seed", "3"],
                     cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="session")
def planted_root(tmp_path_factory) -> Path:
    """Generated data with planted pixel copies: 3 inside train, 3 test images copying train images."""
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("planted") / "brisc"
    generate(root, 24, 8, seed=5, verbose=False, train_duplicates=3, leaks=3)
    return root


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
