"""train.py and test.py end to end, through the real command lines."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_entry

TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "data.split.val_fraction=0.25",
        "eval.batch_size=16", "train.device=cpu", "train.threads=1", "train.log_every_steps=2",
        "train.image_log_every=1"]


def _train_args(root: Path, work: Path, name: str, *extra: str) -> list[str]:
    return ["train.py", "--config", "configs/demo.yaml", "--no-progress", "--opts", f"data.root={root}",
            "data.generated.enabled=false", f"experiment.work_dir={work}", f"experiment.name={name}", *TINY, *extra]


def test_train_then_test(tiny_brisc, tmp_path):
    proc = run_entry(_train_args(tiny_brisc, tmp_path, "e2e", "train.epochs=2", "train.ema=true"), cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "e2e" / "latest"
    for name in ("config.yaml", "split.json", "last.pth", "best.pth", "history.json", "history.csv", "train.log"):
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train/total", "train/cls", "val/accuracy", "val/dice", "lr"} <= set(history[0])

    out = tmp_path / "test_out"
    proc = run_entry(["test.py", "--checkpoint", str(run_dir / "best.pth"), "--split", "test", "--out", str(out),
                      "--tta", "--no-progress", "--num-workers", "0"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 16 and metrics["split"] == "test" and metrics["model"] == "efficient_mtnet"
    for key in ("accuracy", "f1_macro", "dice", "iou", "dice_global", "miou_2class", "loss"):
        assert 0.0 <= metrics[key] <= 1.0 or key == "loss", key
    for name in ("classification_report.txt", "confusion_matrix.png", "per_image.csv"):
        assert (out / name).is_file(), name
    assert "Accuracy" in proc.stdout and "glioma" in proc.stdout

    # Unlabelled folder prediction.
    images = sorted((tiny_brisc / "classification_task" / "test" / "glioma").glob("*.jpg"))[:2]
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    proc = run_entry(["test.py", "--checkpoint", str(run_dir / "best.pth"), "--input", str(folder), "--out",
                      str(tmp_path / "pred")], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = (tmp_path / "pred" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("file,predicted_class")
    assert len(list((tmp_path / "pred" / "masks").glob("*_mask.png"))) == 2


def test_resume_after_kill_matches_uninterrupted_run(tiny_brisc, tmp_path):
    common = ["train.epochs=3", "experiment.deterministic=true", "train.ema=true"]
    full = run_entry(_train_args(tiny_brisc, tmp_path, "full", *common), cwd=REPO)
    assert full.returncode == 0, full.stdout + full.stderr

    # Kill the second run as soon as epoch 2 has been reported (its checkpoint is written before the line).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, *_train_args(tiny_brisc, tmp_path, "cut", *common)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("epoch   2/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    cut_dir = (tmp_path / "cut" / "latest").resolve()
    assert torch.load(cut_dir / "last.pth", weights_only=True)["epoch"] == 2

    resumed = run_entry(["train.py", "--config", "configs/demo.yaml", "--no-progress", "--resume", str(cut_dir)],
                        cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "full" / "latest" / "last.pth", weights_only=True)
    b = torch.load(cut_dir / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert len(json.loads((cut_dir / "history.json").read_text())) == 3


def test_config_errors_are_clear(tmp_path):
    proc = run_entry(["train.py", "--config", "configs/demo.yaml", "--opts", "train.epoch=3"], cwd=REPO)
    assert proc.returncode == 2 and "Did you mean 'train.epochs'" in proc.stderr
    proc = run_entry(["train.py", "--config", "configs/demo.yaml", "--opts", "optim.lr=fast"], cwd=REPO)
    assert proc.returncode == 2 and "'optim.lr'" in proc.stderr and "expected float" in proc.stderr
    proc = run_entry(["train.py", "--config", "configs/demo.yaml", "--opts", f"data.root={tmp_path / 'missing'}",
                      "data.generated.enabled=false", f"experiment.work_dir={tmp_path}"], cwd=REPO)
    assert proc.returncode != 0
    assert "datasets.synthetic" in proc.stderr and "brisc2025" in proc.stderr.lower()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from model import build_model
    from model.loading import load_model_from_checkpoint
    from utils.checkpoint import CheckpointError, atomic_save
    from utils.config import Config, config_to_dict

    cfg = Config()
    other = build_model("light_unet", num_classes=4)
    atomic_save({"model": other.state_dict(), "config": config_to_dict(cfg), "model_name": "light_unet"},
                tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="does not match the EfficientMTNet architecture"):
        load_model_from_checkpoint(tmp_path / "foreign.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_model_from_checkpoint(tmp_path / "broken.pth")
