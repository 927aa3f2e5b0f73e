"""test.py end to end on generated data with planted train/test leaks: subsets, settings, output folders."""
from __future__ import annotations

import csv
import json

from tests.helpers import REPO, run_entry

TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "data.split.val_fraction=0.25",
        "eval.batch_size=16", "train.device=cpu", "train.threads=1", "train.epochs=1"]


def test_leak_free_report_settings_and_output_folders(tmp_path):
    root = tmp_path / "brisc"
    proc = run_entry(["-m", "datasets.synthetic", "--out", str(root), "--train", "48", "--test", "16", "--seed", "3",
                      "--leaks", "2"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    planted = list(json.loads((root / "SYNTHETIC.json").read_text())["planted"]["test_leaks"])
    assert len(planted) == 2 and all("_test_" in stem for stem in planted)
    proc = run_entry(["train.py", "--config", "configs/demo.yaml", "--no-progress", "--opts", f"data.root={root}",
                      "data.generated.enabled=false", f"experiment.work_dir={tmp_path}", "experiment.name=leaks", *TINY],
                     cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = (tmp_path / "leaks" / "latest").resolve()
    checkpoint = str(run_dir / "best.pth")
    common = ["test.py", "--checkpoint", checkpoint, "--no-progress", "--num-workers", "0"]

    proc = run_entry(common, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    default = run_dir / "test_test"
    metrics = json.loads((default / "metrics.json").read_text())
    assert metrics["headline_subset"] == "leak_free" and metrics["resolution"] == "native"
    assert sorted(e["stem"] for e in metrics["leak_check"]["excluded"]) == sorted(planted)
    subsets = metrics["subsets"]
    assert (subsets["all"]["num_images"], subsets["leak_free"]["num_images"], subsets["leaked"]["num_images"]) == (
        16, 14, 2)
    for key in ("accuracy", "f1_macro", "dice", "iou", "dice_train_res"):
        assert metrics[key] == subsets["leak_free"][key], key
    low, high = subsets["all"]["ci95"]["accuracy"]
    assert low <= subsets["all"]["accuracy"] <= high
    assert set(metrics["breakdowns"]) == {"plane", "class", "tumour_size"} and metrics["calibration"]["bins"]
    assert metrics["threshold"] == 0.5 and metrics["threshold_tuned"] is False and metrics["tta"] is False
    with open(default / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["stem"] for r in rows if r["subset"] == "leaked") == sorted(planted)
    for name in ("reliability.png", "breakdowns.png", "confusion_matrix.png"):
        assert (default / name).is_file(), name
    assert "leak-free *" in proc.stdout and "2 of 16 images" in proc.stdout
    first = (default / "metrics.json").read_bytes()

    # Other settings go to their own folder; the default one is left as it was.
    proc = run_entry([*common, "--subset", "all", "--tta", "--tune-threshold", "--calibrate", "--bootstrap", "200"],
                     cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tuned = json.loads(next(run_dir.glob("test_test_all_tta_thr*-tuned_calibrated/metrics.json")).read_text())
    assert tuned["headline_subset"] == "all" and tuned["threshold_tuned"] is True and tuned["tta"] is True
    assert tuned["temperature"] > 0 and tuned["accuracy"] == tuned["subsets"]["all"]["accuracy"]
    assert tuned["threshold_tuning"]["tuned_on"] == "val"
    assert (default / "metrics.json").read_bytes() == first

    # Tuning on the validation split and scoring it too is refused with one line.
    proc = run_entry([*common, "--split", "val", "--tune-threshold"], cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --tune-threshold")
    assert "Traceback" not in proc.stderr
