"""K-fold cross-validation command on tiny generated data."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from engine.cv import main
from utils.tables import summarise
from tests.helpers import REPO, run_entry
from utils.cli import run_main

TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "eval.batch_size=16", "train.device=cpu",
        "train.threads=1", "train.epochs=1", "data.loader.cache=none", "train.image_log_every=0"]


def test_summary_is_mean_and_sample_std():
    rows = [{"fold": 0, "run_dir": "a", "accuracy": 0.9, "dice": 0.5},
            {"fold": 1, "run_dir": "b", "accuracy": 0.8, "dice": 0.7},
            {"fold": 2, "run_dir": "c", "accuracy": 0.4}]
    summary = summarise(rows)
    assert set(summary) == {"accuracy"}  # a figure missing from one fold is left out
    assert abs(summary["accuracy"][0] - 0.7) < 1e-12
    assert abs(summary["accuracy"][1] - statistics.stdev([0.9, 0.8, 0.4])) < 1e-12


def test_cv_trains_every_fold_and_writes_one_table(tiny_brisc, tmp_path):
    proc = run_entry(["-m", "engine.cv", "--config", "configs/demo.yaml", "--folds", "2", "--no-progress", "--opts",
                      f"data.root={tiny_brisc}", "data.generated.enabled=false", f"experiment.work_dir={tmp_path}",
                      "experiment.name=cvt", f"data.loader.cache_dir={tmp_path / 'cache'}", *TINY], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "cvt_cv" / "latest"
    with open(out / "cv_folds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std"]
    # each fold scored on its validation fold by test.py's pipeline (metrics.json in the fold's run folder)
    folds = [json.loads(next(Path(r["run_dir"]).glob("test_val*/metrics.json")).read_text()) for r in rows[:2]]
    assert all(f["split"] == "val" and f["resolution"] == "native" for f in folds)
    accuracy = [f["accuracy"] for f in folds]
    assert abs(float(rows[2]["accuracy"]) - statistics.mean(accuracy)) < 1e-5
    assert abs(float(rows[3]["accuracy"]) - statistics.stdev(accuracy)) < 1e-5
    summary = (out / "cv_summary.md").read_text()
    assert "2-fold cross-validation" in summary and "| accuracy % |" in summary and "±" in summary
    # the two validation folds partition the train split
    splits = [json.loads((Path(r["run_dir"]) / "split.json").read_text()) for r in rows[:2]]
    assert [s["fold"] for s in splits] == [0, 1] and all(s["group_duplicates"] for s in splits)
    assert not set(splits[0]["val"]) & set(splits[1]["val"])
    assert set(splits[0]["val"]) | set(splits[1]["val"]) == set(splits[0]["train"]) | set(splits[0]["val"])


def test_cv_needs_two_folds(tmp_path, capsys):
    assert run_main(main, ["--config", str(REPO / "configs/demo.yaml"), "--opts", f"experiment.work_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "folds" in err and not list(tmp_path.iterdir())
