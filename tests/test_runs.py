"""Runs through the real command lines: monitor modes and validation precision, failed starts, resume rules
(auto, best.pth, finished runs, new settings) and Ctrl-C."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_entry
from tests.test_train_e2e import TINY
from utils.cli import run_main


def _train(root: Path, work: Path, name: str, *extra: str) -> list[str]:
    return ["train.py", "--config", "configs/demo.yaml", "--no-progress", "--opts", f"data.root={root}",
            "data.generated.enabled=false", f"experiment.work_dir={work}", f"experiment.name={name}", *TINY, *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_brisc, tmp_path_factory) -> Path:
    """A finished 2-epoch run that monitors the validation loss and trains in bf16 autocast."""
    work = tmp_path_factory.mktemp("runs")
    proc = run_entry(_train(tiny_brisc, work, "base", "train.epochs=2", "train.amp=bf16", "train.monitor=loss"),
                     cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (work / "base" / "latest").resolve()


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    """train.py in this process, for commands that stop before training (no interpreter start-up to pay)."""
    import train

    args = [str(REPO / a) if a == "configs/demo.yaml" else a for a in args[1:]]
    threads = torch.get_num_threads()  # train.threads would otherwise stay set for the rest of the session
    try:
        code = run_main(train.main, args)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _copy_run(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    """A private copy of a run (its own experiment folder) for a test that changes it."""
    target = tmp_path / name / run.name
    shutil.copytree(run, target)
    return target


def test_loss_monitor_keeps_the_lowest_loss_and_test_py_reproduces_best_val(finished_run, tmp_path):
    history = json.loads((finished_run / "history.json").read_text())
    best_val = json.loads((finished_run / "best_val.json").read_text())
    lowest = min(history, key=lambda row: row["val/loss"])
    assert best_val["epoch"] == lowest["epoch"], "best.pth should hold the epoch with the lowest validation loss"
    assert torch.load(finished_run / "best.pth", weights_only=True)["best_metric"] == pytest.approx(lowest["val/loss"])

    # Validation (during training, bf16 autocast for the training steps) and test.py share eval.precision (fp32).
    out = tmp_path / "val"
    proc = run_entry(["test.py", "--checkpoint", str(finished_run / "best.pth"), "--split", "val", "--out", str(out),
                      "--no-progress", "--num-workers", "0"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Validation scores every image at the training resolution: test.py's `all` subset, `_train_res` figures.
    single = json.loads((out / "metrics.json").read_text())["subsets"]["all"]
    for key in ("loss", "accuracy"):
        assert single[key] == pytest.approx(best_val[key], abs=1e-6), key
    for key in ("dice", "iou", "dice_global", "miou_2class"):
        assert single[f"{key}_train_res"] == pytest.approx(best_val[key], abs=1e-6), key


def test_failed_start_leaves_no_run_directory_and_keeps_latest(finished_run, tiny_brisc, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path, "base")
    (run.parent / "latest").symlink_to(run.name)
    code, out, err = _main(_train(tmp_path / "missing", tmp_path, "base"), capsys)
    assert code == 2 and "missing" in err, out + err
    assert (run.parent / "latest").resolve() == run
    assert sorted(p.name for p in run.parent.iterdir()) == sorted([run.name, "latest"])


def test_resume_auto_on_a_finished_run_says_nothing_to_resume(finished_run, tiny_brisc, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path, "base")
    before = (run / "last.pth").read_bytes()
    code, out, err = _main(_train(tiny_brisc, tmp_path, "base") + ["--resume", "auto"], capsys)
    assert code == 0, out + err
    assert f"resuming {run}" in out
    assert "nothing to resume" in out and str(run / "last.pth") in out
    assert (run / "last.pth").read_bytes() == before


def test_resume_auto_starts_afresh_when_the_newest_run_has_no_checkpoint(finished_run, tiny_brisc, tmp_path):
    run = _copy_run(finished_run, tmp_path, "base")
    before = (run / "last.pth").read_bytes()
    killed = run.parent / "29991231-235959"  # started later, killed during its first epoch
    killed.mkdir()
    (killed / "config.yaml").write_text((run / "config.yaml").read_text())
    proc = run_entry(_train(tiny_brisc, tmp_path, "base", "train.epochs=1") + ["--resume", "auto"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"the newest run of 'base', {killed}, has no checkpoint yet" in proc.stdout
    assert (run / "last.pth").read_bytes() == before
    fresh = (run.parent / "latest").resolve()
    assert fresh not in (run, killed)
    assert [row["epoch"] for row in json.loads((fresh / "history.json").read_text())] == [1]


def test_resume_applies_allowed_changes_and_refuses_the_others(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path)
    other = tmp_path / "longer.yaml"
    other.write_text("train:\n  epochs: 3\neval:\n  threshold: 0.4\n")
    proc = run_entry(["train.py", "--config", str(other), "--no-progress", "--resume", str(run),
                      "--opts", "train.log_every_steps=1"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for change in ("train.epochs changed from 2 to 3", "eval.threshold changed from 0.5 to 0.4",
                   "train.log_every_steps changed from 2 to 1"):
        assert change in proc.stdout, change
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["eval"]["threshold"] == 0.4
    assert [row["epoch"] for row in json.loads((run / "history.json").read_text())] == [1, 2, 3]

    before = (run / "last.pth").read_bytes()
    other.write_text("train:\n  epochs: 4\ndata:\n  preprocess:\n    image_size: 96\n")
    code, out, err = _main(["train.py", "--config", str(other), "--resume", str(run)], capsys)
    assert code == 2 and "'data.preprocess.image_size' cannot change" in err, out + err
    assert (run / "last.pth").read_bytes() == before


def test_resume_from_best_starts_a_new_run_and_leaves_the_old_one(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    last_before = (run / "last.pth").read_bytes()
    best_epoch = torch.load(run / "best.pth", weights_only=True)["epoch"]
    proc = run_entry(["train.py", "--config", "configs/demo.yaml", "--no-progress", "--resume", str(run / "best.pth"),
                      "--opts", "train.epochs=3"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "last.pth").read_bytes() == last_before
    assert len(json.loads((run / "history.json").read_text())) == 2
    new = (finished_run.parent / "latest").resolve()  # a new run of the experiment named in the checkpoint
    assert new not in (run, finished_run) and (new / "split.json").read_text() == (run / "split.json").read_text()
    epochs = [row["epoch"] for row in json.loads((new / "history.json").read_text())]
    assert epochs == list(range(1, 4)) and torch.load(new / "last.pth", weights_only=True)["epoch"] == 3
    assert best_epoch in epochs


def test_a_run_its_budget_stopped_is_not_trained_on_resume(tiny_brisc, tmp_path, capsys):
    proc = run_entry(_train(tiny_brisc, tmp_path, "budget", "train.epochs=5", "train.time_budget_min=0.0001"),
                     cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = (tmp_path / "budget" / "latest").resolve()
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["stopped"] == "time_budget"
    before = (run / "last.pth").read_bytes()
    code, out, err = _main(["train.py", "--config", "configs/demo.yaml", "--resume", str(run)], capsys)
    assert code == 0, out + err
    assert "nothing to resume" in out and "time budget" in out
    assert (run / "last.pth").read_bytes() == before


def test_ctrl_c_exits_130_with_a_resume_command_and_a_usable_checkpoint(tiny_brisc, tmp_path):
    args = _train(tiny_brisc, tmp_path, "sigint", "train.epochs=50", "data.loader.num_workers=2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # A new session, so that the signal reaches the DataLoader workers too, as Ctrl-C in a terminal does.
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive shell
    # inherits it ignored, and Python would then never raise KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    output = "".join(lines) + out + err
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "exited unexpectedly" not in output, output
    run = (tmp_path / "sigint" / "latest").resolve()
    assert f"resume with: python train.py --config {run / 'config.yaml'} --resume {run / 'last.pth'}" in err
    assert "interrupted at epoch " in err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] >= 1
