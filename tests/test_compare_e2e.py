"""test.py's per-image results recompute metrics.json; mask gating both ways; evaluation.compare end to end."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from evaluation.compare import main as compare_main
from tests.helpers import REPO, run_entry
from utils.cli import run_main

TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "data.split.val_fraction=0.25",
        "eval.batch_size=16", "train.device=cpu", "train.threads=1", "train.epochs=1"]


def read_rows(folder) -> list[dict]:
    with open(folder / "per_image.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def recomputed(rows: list[dict]) -> dict:
    """accuracy, macro-F1 (scikit-learn), per-image Dice / IoU / HD95 / ASSD means and the contradiction rate."""
    truth, pred = [r["true_class"] for r in rows], [r["pred_class"] for r in rows]
    tumour = [r for r in rows if r["true_area"] and int(r["true_area"]) > 0]
    contradicting = [(r["pred_class"] == "no_tumor") == (int(r["pred_area"]) > 0) for r in rows]
    return {"accuracy": accuracy_score(truth, pred),
            # macro over the classes present in truth or predictions (scikit-learn's default labels)
            "f1_macro": f1_score(truth, pred, average="macro", zero_division=0),
            "dice": np.mean([float(r["dice"]) for r in tumour]), "iou": np.mean([float(r["iou"]) for r in tumour]),
            "hd95": np.mean([float(r["hd95"]) for r in tumour]), "assd": np.mean([float(r["assd"]) for r in tumour]),
            "contradiction_rate": np.mean(contradicting), "num_images": len(rows)}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    root = tmp / "brisc"
    proc = run_entry(["-m", "datasets.synthetic", "--out", str(root), "--train", "48", "--test", "16", "--seed", "5",
                      "--leaks", "2"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    proc = run_entry(["train.py", "--config", "configs/demo.yaml", "--no-progress", "--opts", f"data.root={root}",
                      "data.generated.enabled=false", f"experiment.work_dir={tmp}", "experiment.name=cmp", *TINY], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = (tmp / "cmp" / "latest").resolve()
    common = ["test.py", "--checkpoint", str(run_dir / "best.pth"), "--no-progress", "--num-workers", "0",
              "--bootstrap", "200"]
    for extra in ([], ["--gate-masks"]):
        proc = run_entry([*common, *extra], cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, run_dir, proc.stdout


def test_per_image_csv_recomputes_metrics_json(scored):
    _, run_dir, _ = scored
    for folder in (run_dir / "test_test", run_dir / "test_test_gated"):
        metrics = json.loads((folder / "metrics.json").read_text())
        rows = read_rows(folder)
        assert {r["subset"] for r in rows} == {"leak_free", "leaked"} and len(rows) == 16
        assert all(int(r["width"]) > 0 and int(r["height"]) > 0 for r in rows)
        for r in rows:
            probs = [float(r[f"prob_{c}"]) for c in ("glioma", "meningioma", "no_tumor", "pituitary")]
            assert sum(probs) == pytest.approx(1.0, abs=1e-6)
            assert r["true_class"] == "no_tumor" or r["hd95"] != ""  # distances for every tumour image
        for subset in ("all", "leak_free", "leaked"):
            chosen = [r for r in rows if subset == "all" or r["subset"] == subset]
            figures = metrics["subsets"][subset]
            for key, value in recomputed(chosen).items():
                assert figures[key] == pytest.approx(value, abs=1e-9), (folder.name, subset, key)
        assert metrics["hd95"] == metrics["subsets"]["leak_free"]["hd95"]
        low, high = metrics["subsets"]["all"]["ci95"]["hd95"]
        assert low <= metrics["subsets"]["all"]["hd95"] <= high


def test_gated_and_ungated_figures_are_both_reported(scored):
    _, run_dir, stdout = scored
    plain = json.loads((run_dir / "test_test" / "metrics.json").read_text())
    gated = json.loads((run_dir / "test_test_gated" / "metrics.json").read_text())
    assert plain["gate_masks"] is False and gated["gate_masks"] is True
    for subset in ("all", "leak_free"):
        both = plain["subsets"][subset]["mask_gating"]
        assert both["applied"] is False and gated["subsets"][subset]["mask_gating"]["applied"] is True
        for key, value in both["gated"].items():
            assert gated["subsets"][subset][key] == pytest.approx(value), key
            assert gated["subsets"][subset]["mask_gating"]["gated"][key] == pytest.approx(value), key
        for key, value in both["ungated"].items():
            assert plain["subsets"][subset][key] == pytest.approx(value), key
        assert gated["subsets"][subset]["num_mask_without_tumour_class"] == 0
    assert "contradiction rate" in stdout and "HD95 (pixels)" in stdout


def test_compare_a_run_with_itself(scored, capsys):
    tmp, run_dir, _ = scored
    out = tmp / "self"
    code = run_main(compare_main, [str(run_dir), str(run_dir / "test_test" / "metrics.json"), "--out", str(out),
                                   "--bootstrap", "300"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    result = json.loads((out / "compare.json").read_text())
    assert result["num_images"] == 14 and result["subset"] == "leak_free"
    assert set(result["figures"]) == {"accuracy", "dice", "iou", "hd95", "assd"}
    for name, figure in result["figures"].items():
        assert figure["difference"] == 0.0 and figure["ci95"] is None and figure["p_value"] == 1.0, name  # degenerate
    assert (out / "paired_dice.png").is_file() and "McNemar" in stdout


def test_compare_refuses_other_images_and_conventions(scored, capsys):
    tmp, run_dir, _ = scored
    assert run_main(compare_main, [str(run_dir / "test_test"), str(run_dir / "test_test_gated"), "--out",
                                   str(tmp / "x")]) == 2
    assert "error: the results differ in gate_masks" in capsys.readouterr().err
    fewer = tmp / "fewer"
    shutil.copytree(run_dir / "test_test", fewer)
    lines = (fewer / "per_image.csv").read_text().splitlines()
    (fewer / "per_image.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert run_main(compare_main, [str(run_dir), str(fewer), "--subset", "all", "--out", str(tmp / "y")]) == 2
    assert "different images" in capsys.readouterr().err
    other = tmp / "threshold"
    shutil.copytree(run_dir / "test_test", other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["threshold"] = 0.4
    (other / "metrics.json").write_text(json.dumps(metrics))
    assert run_main(compare_main, [str(run_dir), str(other), "--out", str(tmp / "z")]) == 2
    assert "differ in threshold" in capsys.readouterr().err
    assert not (tmp / "x").exists() and not (tmp / "y").exists()


def test_compare_names_a_missing_result(tmp_path, capsys):
    assert run_main(compare_main, [str(tmp_path / "nowhere"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere: no metrics.json found" in err and "test.py" in err
    (tmp_path / "metrics.json").write_text("{}")
    assert run_main(compare_main, [str(tmp_path), str(tmp_path)]) == 2
    assert "no per_image.csv" in capsys.readouterr().err
