"""configs/comparison.yaml: every registry model that trains on a CPU has a run, or the file says why not."""
from __future__ import annotations

from pathlib import Path

from engine.sweep import length_overrides, plan_runs, read_runs_file
from model import build_model, list_models
from model.loading import model_kwargs
from model.registry import _REGISTRY

REPO = Path(__file__).resolve().parents[1]
COMPARISON = REPO / "configs" / "comparison.yaml"


def test_every_registry_model_has_a_run_or_a_stated_reason(tmp_path):
    settings = read_runs_file(COMPARISON)
    runs = plan_runs(REPO / "configs/brisc_cpu.yaml", [], settings, [0], tmp_path, length_overrides(None, 20))
    by_name = {run.setting.name: run.cfg for run in runs}
    compared = {cfg.model.name for cfg in by_name.values()}
    header = "".join(line for line in COMPARISON.read_text().splitlines(keepends=True) if line.startswith("#"))
    shipped = [name for name in list_models() if _REGISTRY[name].__module__.startswith("model.")]  # not tests' own
    for name in shipped:
        assert name in compared or f"- {name} (" in header, f"{name}: no run and no stated reason"
    for run in runs:  # one budget for all; every model builds from its kwargs
        assert run.cfg.train.time_budget_min == 20
        build_model(run.cfg.model.name, **model_kwargs(run.cfg, pretrained=False))
    base = by_name["efficient_mtnet"]
    for name, cfg in by_name.items():  # same data, schedule family and optimiser as the default recipe
        assert (cfg.data.preprocess.image_size, cfg.data.loader.batch_size, cfg.optim.name, cfg.sched.name) == \
            (base.data.preprocess.image_size, base.data.loader.batch_size, base.optim.name, base.sched.name), name
    assert by_name["efficientnet_b0_cls"].loss.seg_weight == 0.0
