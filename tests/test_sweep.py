"""The sweep command: grid expansion, runs files, validation before training, aggregation, and resume."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from engine.sweep import length_overrides, main, plan_runs
from engine.sweep_settings import Setting, check_names, expand_grid, override_text, read_runs_file, split_values
from engine.sweep_table import format_cell as _cell, render_markdown, seed_summary as aggregate
from model import build_model
from model.loading import model_kwargs
from tests.helpers import REPO
from utils.cli import run_main
from utils.config import ConfigError, parse_override

TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "eval.batch_size=16", "train.device=cpu",
        "train.threads=1", "data.loader.cache=none", "train.image_log_every=0", "data.generated.enabled=false"]


def test_grid_is_the_cartesian_product_in_order():
    settings = expand_grid(["model.kwargs.ham_rank=8,16,32", "loss.seg.focal=0,0.5"])
    assert [s.name for s in settings] == ["ham_rank=8_focal=0", "ham_rank=8_focal=0.5", "ham_rank=16_focal=0",
                                          "ham_rank=16_focal=0.5", "ham_rank=32_focal=0", "ham_rank=32_focal=0.5"]
    assert settings[3].overrides == ["model.kwargs.ham_rank=16", "loss.seg.focal=0.5"]


def test_grid_values_keep_commas_inside_brackets_and_same_leaves_use_full_keys():
    assert split_values("[0.4,0.2],[],[1, 2]") == ["[0.4,0.2]", "[]", "[1, 2]"]
    settings = expand_grid(["loss.aux_weights=[0.4,0.2],[]", "loss.seg.dice=1", "loss.seg.bce=1"])
    assert [s.overrides[0] for s in settings] == ["loss.aux_weights=[0.4,0.2]", "loss.aux_weights=[]"]
    clash = expand_grid(["loss.cls_weight=1", "model.kwargs.cls_weight=2"])  # the same leaf name twice
    assert clash[0].name == "loss.cls_weight=1_model.kwargs.cls_weight=2"


@pytest.mark.parametrize("specs,message", [([], "empty"), (["model.kwargs.ham_rank"], "section.key=value1"),
                                           (["a.b=1", "a.b=2"], "twice"), (["a.b=1,,2"], "empty value")])
def test_bad_grids_are_refused(specs, message):
    with pytest.raises(ConfigError, match=message):
        expand_grid(specs)


def test_runs_file_overrides_read_back_unchanged(tmp_path):
    path = tmp_path / "runs.yaml"
    path.write_text("runs:\n  baseline: {}\n  nothing:\n  mixed: {model.kwargs.context: none, optim.lr: 1.0e-5, "
                    "loss.aux_weights: [0.4, 0.2], model.kwargs.se: false, data.layout.mask_suffix: 'null'}\n")
    settings = read_runs_file(path)
    assert [s.name for s in settings] == ["baseline", "nothing", "mixed"]
    assert settings[0].overrides == [] and settings[1].overrides == []
    values = {".".join(path): value for path, value in map(parse_override, settings[2].overrides)}
    assert values == {"model.kwargs.context": "none", "optim.lr": 1e-5, "loss.aux_weights": [0.4, 0.2],
                      "model.kwargs.se": False, "data.layout.mask_suffix": "null"}
    for value in (1e-5, "none", "null", [0.4, 0.2], True, {"a": [1, 2]}, None, "a: b"):
        assert parse_override(override_text("k", value))[1] == value


def test_runs_file_errors(tmp_path):
    path = tmp_path / "runs.yaml"
    path.write_text("runs:\n  a: {optim.lr: 0.1}\n  a: {optim.lr: 0.2}\n")
    with pytest.raises(ConfigError, match="'a' appears twice"):
        read_runs_file(path)
    path.write_text("runs: []\n")
    with pytest.raises(ConfigError, match="non-empty mapping 'runs:'"):
        read_runs_file(path)
    path.write_text("runs:\n  'bad name/x': {}\n")
    with pytest.raises(ConfigError, match="names a folder"):
        read_runs_file(path)
    with pytest.raises(ConfigError, match="two runs are named 'x'"):
        check_names([Setting("x", ["optim.lr=0.1"]), Setting("x", [])])
    with pytest.raises(ConfigError, match="experiment.seed"):
        check_names([Setting("x", ["experiment.seed=3"])])


@pytest.mark.parametrize("grid,key", [("model.kwargs.bogus=1", "model.kwargs.bogus"),
                                      ("train.epochz=1", "train.epochz"),
                                      ("model.kwargs.context=nmf,foo", "context")])
def test_a_bad_key_fails_before_anything_is_written(grid, key, tmp_path, capsys):
    code = run_main(main, ["--config", str(REPO / "configs/demo.yaml"), "--grid", grid, "--out", str(tmp_path / "s"),
                           "--opts", "data.preprocess.image_size=32"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: run '") and key in err
    assert not (tmp_path / "s").exists()


def test_aggregation_is_mean_and_sample_std_by_hand():
    results = [{"accuracy": 0.9, "dice": 0.8, "hd95": 10.0, "f1_macro": 0.5, "epochs": 3, "run_dir": "a"},
               {"accuracy": 0.8, "dice": 0.6, "hd95": 20.0, "f1_macro": None, "epochs": 3, "run_dir": "b"},
               {"accuracy": 0.4, "dice": 0.7, "hd95": 30.0, "epochs": 2, "run_dir": "c"}]
    summary = aggregate(results)
    assert "f1_macro" not in summary  # missing in a seed: left out rather than averaged over fewer seeds
    assert summary["accuracy"][0] == pytest.approx(0.7)
    assert summary["accuracy"][1] == pytest.approx(math.sqrt((0.04 + 0.01 + 0.09) / 2))  # ddof=1: 0.26458
    assert summary["dice"] == pytest.approx((0.7, 0.1))
    assert summary["hd95"] == pytest.approx((20.0, 10.0))
    assert summary["epochs"][0] == pytest.approx(8 / 3)
    assert _cell("accuracy", summary, results) == "70.00 ± 26.46"
    assert _cell("hd95", summary, results) == "20.00 ± 10.00"
    assert _cell("f1_macro", summary, results) == "–"
    one = [{"accuracy": 0.9, "ci95": {"accuracy": [0.85, 0.95]}, "run_dir": "a"}]
    assert _cell("accuracy", aggregate(one), one) == "90.00 [85.00, 95.00]"
    rows = [{"setting": Setting("s", ["optim.lr=0.1"]), "seeds": [0, 1, 2], "done": results, "failed": [],
             "summary": summary, "params": 1_385_359, "gmacs": 0.0572}]
    table = render_markdown(rows, "t", "val")
    row = "| s | `optim.lr=0.1` | 3/3 | 70.00 ± 26.46 | – | 70.00 ± 10.00 | – | 20.00 ± 10.00 | 1.385 | 0.057 |"
    assert row in table


def test_sweep_runs_records_failures_and_resumes(tiny_brisc, tmp_path, capsys, one_thread):
    runs = tmp_path / "runs.yaml"
    runs.write_text(f"runs:\n  ok: {{}}\n  broken: {{data.root: {tmp_path / 'missing'}}}\n")
    out = tmp_path / "sweep"
    args = ["--config", str(REPO / "configs/demo.yaml"), "--runs", str(runs), "--epochs", "1", "--out", str(out),
            "--bootstrap", "50", "--no-progress", "--opts", f"data.root={tiny_brisc}",
            f"data.loader.cache_dir={tmp_path / 'cache'}", *TINY]
    assert run_main(main, args) == 1  # the broken run failed, the other one finished
    printed = capsys.readouterr()
    assert "run 2/2: broken seed 42 (new)" in printed.out and "FAILED" in printed.err
    ok = json.loads((out / "ok" / "seed42" / "result.json").read_text())
    assert ok["status"] == "done" and ok["epochs"] == 1 and ok["scored"]["split"] == "val"
    metrics = json.loads((Path(ok["run_dir"]) / "test_val" / "metrics.json").read_text())
    assert ok["dice"] == metrics["dice"] and ok["ci95"]["accuracy"] == metrics["ci95"]["accuracy"]
    assert json.loads((out / "broken" / "seed42" / "result.json").read_text())["status"] == "failed"
    table = (out / "sweep.md").read_text()
    assert "val, leak-free, native res., thr 0.50" in table and "a fixed length of 1 epoch per run" in table
    assert "| broken |" in table and "0/1" in table and "Failed runs" in table
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("setting,overrides,seeds_planned")
    assert (out / "sweep.png").stat().st_size > 0

    # Again: the finished run is skipped, the failed one retried.
    assert run_main(main, args) == 1
    printed = capsys.readouterr().out
    assert "ok seed 42: finished earlier, skipped" in printed and "broken seed 42 (retry)" in printed
    assert len([p for p in (out / "ok" / "seed42").iterdir() if p.is_dir() and not p.is_symlink()]) == 1

    # Trained but not scored (result.json lost): scored without training again.
    (out / "ok" / "seed42" / "result.json").unlink()
    shutil.rmtree(Path(ok["run_dir"]) / "test_val")
    one_run = ["--runs", str(runs.with_name("one.yaml"))]
    runs.with_name("one.yaml").write_text("runs:\n  ok: {}\n")
    args_one = [a for a in args if a not in ("--runs", str(runs))] + one_run
    assert run_main(main, args_one) == 0
    assert "training finished" in capsys.readouterr().out
    assert (Path(ok["run_dir"]) / "test_val" / "metrics.json").is_file()

    # More epochs: the same run directory trains on from its last.pth.
    args_two = list(args_one)
    args_two[args_two.index("--epochs") + 1] = "2"
    assert run_main(main, args_two) == 0
    assert f"resuming {ok['run_dir']}" in capsys.readouterr().out
    again = json.loads((out / "ok" / "seed42" / "result.json").read_text())
    assert again["run_dir"] == ok["run_dir"] and again["epochs"] == 2


def test_shipped_ablation_file_plans_against_the_cpu_recipe(tmp_path):
    settings = read_runs_file(REPO / "configs/ablation.yaml")
    assert len(settings) == 19 and settings[0].name == "baseline" and settings[0].overrides == []
    runs = plan_runs(REPO / "configs/brisc_cpu.yaml", [], settings, [0], tmp_path, length_overrides(30, None))
    for run in runs:  # every model builds from its kwargs
        assert run.cfg.train.epochs == 30 and run.cfg.train.time_budget_min == 0
        build_model(run.cfg.model.name, **model_kwargs(run.cfg, pretrained=False))
    by_name = {run.setting.name: run.cfg for run in runs}
    # one constructor argument changes; the recipe's own model.kwargs stay
    assert by_name["context_attention"].model.kwargs == {"output_stride": 2, "context": "attention"}
    assert by_name["output_stride4"].model.kwargs == {"output_stride": 4}
    assert by_name["bce_dice_focal"].loss.seg.focal == 1.0 and by_name["bce_dice_focal"].loss.seg.bce == 1.0
    assert by_name["no_deep_supervision"].model.deep_supervision is False


def test_sweep_tests_each_setting_against_the_baseline_with_holm(tiny_brisc, tmp_path, one_thread):
    from evaluation.compare import compare, locate
    from evaluation.stats import holm

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs:\n  base: {}\n  smooth: {loss.label_smoothing: 0.2}\n  lr: {optim.lr: 0.01}\n")
    out = tmp_path / "sweep"
    args = ["--config", str(REPO / "configs/demo.yaml"), "--runs", str(runs), "--epochs", "1", "--out", str(out),
            "--bootstrap", "50", "--no-progress", "--opts", f"data.root={tiny_brisc}",
            f"data.loader.cache_dir={tmp_path / 'cache'}", *TINY]
    assert run_main(main, args) == 0
    paired = json.loads((out / "sweep_paired.json").read_text())
    assert paired["baseline"] == "base" and {t["setting"] for t in paired["tests"]} == {"smooth", "lr"}
    # each test is evaluation.compare's, and the adjustment is Holm over all of them
    result = {name: json.loads((out / name / "seed42" / "result.json").read_text()) for name in ("base", "lr")}
    direct = compare([locate(Path(result[n]["run_dir"]), "val") for n in ("base", "lr")], "leak_free", seed=42)
    mine = {t["figure"]: t for t in paired["tests"] if t["setting"] == "lr"}
    assert mine["accuracy"]["p_value"] == pytest.approx(direct["figures"]["accuracy"]["p_value"])
    assert [t["p_holm"] for t in paired["tests"]] == pytest.approx(holm([t["p_value"] for t in paired["tests"]]))
    assert "## Paired against `base`" in (out / "sweep.md").read_text()
    with pytest.raises(ConfigError, match="--baseline nothing: no such setting"):
        main(args + ["--baseline", "nothing"])
