"""A full disk, for real: a run's folder on a small tmpfs that another process fills during training. The run
stops with one line naming the checkpoint and the space it needed, last.pth / best.pth of the last good epoch
stay intact and loadable, no temporary file is left, and `--resume auto` continues once space is freed. The
shared writers (checkpoints, JSON/CSV of a run) meet a disk that fills during the write. Skips without mount."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.faults_common import entry_env, one_error_line, tmpfs_volume, train_args
from tests.helpers import REPO, run_entry
from utils.checkpoint import atomic_save, read_checkpoint
from utils.disk import DiskFullError
from utils.runs import write_json_atomic


@pytest.fixture
def disk(tmp_path):
    yield from tmpfs_volume(tmp_path, "96m")


def _fill(disk: Path, leave: int) -> Path:
    """Another process's file that leaves `leave` bytes free on `disk`."""
    import shutil

    filler = disk / "filler.bin"
    with open(filler, "wb") as handle:
        left = shutil.disk_usage(disk).free - leave
        while left > 0:
            left -= handle.write(b"\0" * min(left, 1 << 20))
    return filler


def test_training_on_a_disk_that_fills_stops_cleanly_and_resumes(tmp_path, disk):
    data, work = tmp_path / "data", disk / "runs"
    # The real train.py; before epoch 2 is saved, the disk is filled up to 200 KiB by "another process".
    script = textwrap.dedent(f"""
        import runpy, sys
        import engine.trainer as trainer
        from tests.test_faults_disk import _fill
        from pathlib import Path
        save = trainer.Trainer._save
        def save_on_a_full_disk(self, epoch, *args):
            if epoch == 2:
                _fill(Path({str(disk)!r}), 200 << 10)
            return save(self, epoch, *args)
        trainer.Trainer._save = save_on_a_full_disk
        sys.argv = {train_args(data, work, 3)!r}
        runpy.run_path("train.py", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=entry_env(), capture_output=True,
                          text=True, timeout=280)
    print(proc.stderr)  # shown with pytest -s: what the user sees
    line = one_error_line(proc)
    run = (work / "demo" / "latest").resolve()
    assert re.search(rf"not enough disk space to write the checkpoint '{re.escape(str(run))}/last.pth': it needs "
                     r"[\d.]+ MiB, [\d.]+ KiB free", line), line
    assert "training stopped at epoch 2" in line and "last good checkpoint (epoch 1)" in line and "--resume" in line
    for name in ("last.pth", "best.pth"):  # the last good epoch, whole and loadable
        assert read_checkpoint(run / name)["epoch"] == 1
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    (disk / "filler.bin").unlink()

    resumed = run_entry(train_args(data, work, 3, "--resume", "auto"), cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after epoch 1" in resumed.stdout
    assert read_checkpoint(run / "last.pth")["epoch"] == 3
    assert [row["epoch"] for row in json.loads((run / "history.json").read_text())] == [1, 2, 3]


def test_a_checkpoint_write_that_meets_a_full_disk_keeps_the_previous_file(disk, monkeypatch):
    import utils.checkpoint as checkpoint

    path = disk / "last.pth"
    atomic_save({"model": {"w": torch.ones(10)}, "config": {}, "epoch": 1}, path)
    previous = path.read_bytes()
    _fill(disk, 3 << 20)
    big = {"model": {"w": torch.ones(2_000_000)}, "config": {}, "epoch": 2}  # 8 MiB
    with pytest.raises(DiskFullError, match=r"write the checkpoint '.*last.pth': it needs 8.0 MiB, 3.0 MiB free"):
        atomic_save(big, path)  # the check before the write
    # The check passes (the space went after it): torch.save itself meets ENOSPC mid-write.
    monkeypatch.setattr(checkpoint, "ensure_free_space", lambda *args: 3 << 20)
    with pytest.raises(DiskFullError, match="not enough disk space to write the checkpoint"):
        atomic_save(big, path)
    assert path.read_bytes() == previous and read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", "last.pth"]


def test_run_json_files_meet_a_full_disk(disk, monkeypatch):
    """The writer behind metrics.json, history.json, best_val.json (utils.runs.write_json_atomic)."""
    import utils.runs as runs

    path = disk / "metrics.json"
    write_json_atomic({"accuracy": 0.5}, path)
    _fill(disk, 64 << 10)
    rows = [{"image": f"img{i:06d}", "dice": 0.5} for i in range(20_000)]  # about 1 MiB of JSON
    with pytest.raises(DiskFullError, match=r"write the JSON file '.*metrics.json': it needs 996.1 KiB, 64.0 KiB free"):
        write_json_atomic(rows, path)
    monkeypatch.setattr(runs, "ensure_free_space", lambda *args: 64 << 10)
    with pytest.raises(DiskFullError):
        write_json_atomic(rows, path)
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", "metrics.json"]
