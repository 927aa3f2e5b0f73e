"""Two gloo processes on the CPU: DDP training, and validation metrics aggregated from counts across ranks."""
from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, run_entry
from tests.test_train_e2e import TINY


def test_two_process_training_matches_single_process_evaluation(tiny_brisc, tmp_path):
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
            "--config", "configs/demo.yaml", "--no-progress", "--opts", f"data.root={tiny_brisc}",
            "data.synthetic=false", f"experiment.work_dir={tmp_path}", "experiment.name=ddp", *TINY,
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
