"""The acquisition-shift benchmark (evaluation/shift.py): clean row = test.py, summary arithmetic, outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.factory import build_eval_dataset
from datasets.mri_shifts import ShiftHook, apply_shift
from utils.cli import run_main
from evaluation.shift import HEADLINE, main, suite_summary as summarise
from tests.helpers import save_untrained_checkpoint
from utils.config import load_config

METRICS = [key for key, _ in HEADLINE]


@pytest.fixture(scope="module")
def checkpoint(tiny_brisc, tmp_path_factory) -> Path:
    """An untrained (randomly initialised, seeded) model saved as a run checkpoint: its predictions vary per image."""
    return save_untrained_checkpoint(tiny_brisc, tmp_path_factory.mktemp("run"))


def test_clean_row_equals_test_py_and_outputs(checkpoint, tmp_path, capsys):
    from evaluation.pipeline import TestOptions, run_test

    reference = run_test(TestOptions(checkpoint=checkpoint, split="test", out_dir=tmp_path / "test",
                                     num_workers=0, show_progress=False))
    out = tmp_path / "shift"
    assert main(["--checkpoint", str(checkpoint), "--split", "test", "--shifts", "noise", "rotate_zoom",
                 "--severities", "1", "3", "--out", str(out), "--no-progress", "--num-workers", "0"]) == 0
    result = json.loads((out / "shift.json").read_text())
    every_image = reference["subsets"]["all"]  # shifts are scored on every image, at the training resolution
    for key in METRICS:
        expected = every_image[f"{key}_train_res"] if f"{key}_train_res" in every_image else every_image[key]
        assert result["clean"][key] == pytest.approx(expected, abs=1e-12), key
    assert result["num_images"] == every_image["num_images"] == 16
    assert (result["subset"], result["resolution"]) == ("all", "training")
    assert set(result["shifted"]) == {"noise", "rotate_zoom"}
    assert set(result["shifted"]["noise"]) == {"1", "3"}
    # the shifts reach the model: some figure moves under the strongest rotation/zoom
    assert any(result["shifted"]["rotate_zoom"]["3"][k] != result["clean"][k] for k in METRICS)
    assert result["severity_params"]["noise"]["3"]["sigma"] == 14.0
    assert (out / "shift.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "rotate_zoom" in printed and "drop from clean" in printed

    # Same seed, same figures; a different seed draws other noise.
    again = tmp_path / "again"
    main(["--checkpoint", str(checkpoint), "--split", "test", "--shifts", "noise", "--severities", "3",
          "--out", str(again), "--no-progress", "--num-workers", "0"])
    assert json.loads((again / "shift.json").read_text())["shifted"]["noise"]["3"] == result["shifted"]["noise"]["3"]


def test_dataset_hook_applies_the_shift_per_image(checkpoint, tiny_brisc):
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_brisc}", "data.generated.enabled=false", "data.preprocess.image_size=64",
                                            "data.loader.cache=none"])
    dataset = build_eval_dataset(cfg.data, "test", verbose=False)
    clean = dataset[3]
    dataset.shift = ShiftHook("rotate_zoom", 3, seed=0)
    shifted = dataset[3]
    dataset.shift = None
    assert torch.equal(dataset[3]["image"], clean["image"])
    assert not torch.equal(shifted["image"], clean["image"])
    # the hook is exactly apply_shift on the decoded arrays, keyed by the image id
    from datasets.decode import load_sample

    image, mask = load_sample(dataset.samples[3], 64)
    expected_image, expected_mask = apply_shift("rotate_zoom", 3, image, mask, clean["id"], seed=0)
    expected, expected_mask_t = dataset.transform(expected_image, expected_mask)
    assert torch.equal(shifted["image"], expected) and torch.equal(shifted["mask"], expected_mask_t)


def test_summary_against_hand_computation():
    clean = {"accuracy": 0.9, "f1_macro": 0.8, "dice": 0.7, "iou": 0.6}
    shifted = {
        "a": {"1": {"accuracy": 0.8, "f1_macro": 0.8, "dice": 0.6, "iou": 0.5},
              "2": {"accuracy": 0.6, "f1_macro": 0.4, "dice": 0.5, "iou": 0.4}},
        "b": {"1": {"accuracy": 0.9, "f1_macro": 0.8, "dice": 0.7, "iou": 0.6},
              "2": {"accuracy": 0.7, "f1_macro": 0.6, "dice": 0.3, "iou": 0.2}},
    }
    out = summarise(clean, shifted, ["1", "2"])
    assert out["mean_by_severity"]["2"]["accuracy"] == pytest.approx(0.65)
    assert out["mean"]["accuracy"] == pytest.approx(0.75)
    assert out["drop"]["accuracy"] == pytest.approx(0.15)
    assert out["drop_by_severity"]["1"]["dice"] == pytest.approx(0.05)
    # CE_a(accuracy) = mean(0.2, 0.4) = 0.3; CE_b = mean(0.1, 0.3) = 0.2; mCE = 0.25; relative = 0.25 - 0.1
    assert out["corruption_error"]["a"]["accuracy"] == pytest.approx(0.3)
    assert out["mce"]["accuracy"] == pytest.approx(0.25)
    assert out["relative_mce"]["accuracy"] == pytest.approx(0.15)
    # normalised by a reference whose errors are twice as large: 0.5
    ref = {"corruption_error": {n: {m: 2 * v for m, v in ce.items()} for n, ce in out["corruption_error"].items()}}
    normalised = summarise(clean, shifted, ["1", "2"], reference=ref)["mce_normalised"]
    assert normalised["accuracy"] == pytest.approx(0.5) and normalised["iou"] == pytest.approx(0.5)
    assert np.isfinite(list(normalised.values())).all()


def test_bad_arguments_exit_2(checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:  # the range is declared in the parser
        main(["--checkpoint", str(checkpoint), "--split", "test", "--severities", "4", "--no-progress"])
    assert exc.value.code == 2 and "expected a severity in (0, 3], got 4" in capsys.readouterr().err
    assert run_main(main, ["--checkpoint", str(checkpoint), "--reference", "missing.json", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(checkpoint), "--shifts", "motion"])
    assert exc.value.code == 2


def test_compare_table_lists_each_run(tmp_path, capsys):
    clean = {"accuracy": 0.9, "f1_macro": 0.8, "dice": 0.7, "iou": 0.6}
    shifted = {"noise": {"2": {"accuracy": 0.8, "f1_macro": 0.7, "dice": 0.5, "iou": 0.4}}}
    paths = []
    for name, norm in (("base", "imagenet"), ("zscore", "zscore")):
        run = tmp_path / name / "20260101-000000"
        run.mkdir(parents=True)
        result = {"checkpoint": str(run / "best.pth"), "intensity_norm": norm, "severities": ["2"],
                  "mri_augment": {"p_bias_field": 0.3, "p_mri_gamma": 0.3, "p_mri_noise": 0.5} if name == "zscore" else {}, "clean": clean,
                  "shifted": shifted, **summarise(clean, shifted, ["2"])}
        paths.append(run / "shift.json")
        paths[-1].write_text(json.dumps(result))
    assert main(["--compare", *map(str, paths)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 4
    assert rows[2].startswith("| base | imagenet | none | 90.00 | 70.00 | 80.00 | 50.00 | 80.00 | 50.00 | 10.00 "
                              "| 20.00")
    assert rows[3].startswith("| zscore | zscore | bias_field, gamma at 0.3; noise at 0.5 |")
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "give --checkpoint" in capsys.readouterr().err
