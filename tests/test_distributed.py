"""Two gloo processes on the CPU: DDP training, validation metrics aggregated from counts across ranks, and a
time budget that rank 0 decides for every rank."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import REPO, run_entry
from tests.test_train_e2e import TINY


def test_two_process_training_matches_single_process_evaluation(tiny_brisc, tmp_path):
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
            "--config", "configs/demo.yaml", "--no-progress", "--opts", f"data.root={tiny_brisc}",
            "data.generated.enabled=false", f"experiment.work_dir={tmp_path}", "experiment.name=ddp", *TINY,
            "train.epochs=1", "train.sync_bn=true"]
    proc = run_entry(args, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x2 processes" in proc.stdout
    run_dir = (tmp_path / "ddp" / "latest").resolve()
    val_ddp = json.loads((run_dir / "best_val.json").read_text())

    out = tmp_path / "single"
    proc = run_entry(["test.py", "--checkpoint", str(run_dir / "last.pth"), "--split", "val", "--out", str(out),
                      "--no-progress", "--num-workers", "0"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Validation during training scores every image at the training resolution: test.py's `all` subset and
    # its `_train_res` segmentation figures.
    single = json.loads((out / "metrics.json").read_text())["subsets"]["all"]
    assert single["num_images"] == val_ddp["num_images"]
    assert single["confusion_matrix"] == val_ddp["confusion_matrix"]
    for key in ("accuracy", "f1_macro", "loss"):
        assert single[key] == pytest.approx(val_ddp[key], abs=1e-5), key
    for key in ("dice", "iou", "dice_global", "iou_global", "miou_2class"):
        assert single[f"{key}_train_res"] == pytest.approx(val_ddp[key], abs=1e-5), key


def _budget_rank(rank: int, port: int, root: str, work: str, out: str) -> None:
    """One rank of a 2-process gloo run whose ranks' clocks disagree about the time budget."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from engine.trainer import Trainer
    from utils.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"data.root={root}", "data.generated.enabled=false", f"experiment.work_dir={work}", "experiment.name=budget", *TINY,
        "data.loader.batch_size=4", "train.epochs=4", "train.time_budget_min=10", "train.log_every_steps=1",
        "train.image_log_every=0"])
    trainer = Trainer(cfg, show_progress=False)

    # Rank 1's clock says the budget is already spent; rank 0's says so after 6 optimiser steps (epoch 2, step 2).
    def time_left() -> float:
        if rank == 1:
            return -1.0
        return 1e6 if trainer._ctx is None or trainer._ctx.global_step < 6 else -1.0

    trainer._time_left = time_left
    trainer.fit()
    summary = {"global_step": trainer.global_step, "epoch": trainer.epoch, "planned": trainer.planned_epochs,
               "total_steps": trainer.schedule.total_steps, "lr": trainer.schedule.lr, "stopped": trainer.stopped}
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))


def test_time_budget_is_decided_by_rank_0_for_every_rank(tiny_brisc, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_budget_rank, args=(rank, port, str(tiny_brisc), str(tmp_path), str(tmp_path)))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=400)
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung, "a rank hung: the ranks stopped at different steps"
    assert [proc.exitcode for proc in procs] == [0, 0]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1
    # 36 training images, 2 ranks, batch 4: 4 steps per epoch; rank 0's budget ran out at step 6.
    assert rank0["global_step"] == 6 and rank0["epoch"] == 2 and rank0["stopped"] == "time_budget"
    assert rank0["planned"] == 2 and rank0["total_steps"] == 8
