"""What a sweep (`engine.sweep`) measures beside training and scoring a run: a setting's cost (parameters,
GMACs, CPU latency) and a run's figures on an external dataset (`--external FILE.yaml`).

Latency is measured for every setting one after another in one pass, once the runs are done, so that the rows
are timed side by side on the same machine in the same state (a quiet one: say so when you quote it). It is
eager PyTorch, fp32, eval mode, random weights (the time does not depend on them), at `data.preprocess.image_size`, with
the process's threads; kept in `<out>/latency.json` and measured again only for a setting whose model, size or
thread count changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from evaluation.external_sets import ExternalSet
from utils.config import Config, ConfigError

LATENCY_FILE = "latency.json"
LATENCY_BATCHES = (1, 8)  # latency at batch 1 (one upload), throughput at batch 8 (a folder)


def build_setting_model(cfg: Config, name: str) -> torch.nn.Module:
    """The setting's model with random weights in eval mode; a bad `model.kwargs` names the run."""
    from model import build_model
    from model.loading import model_kwargs

    try:
        return build_model(cfg.model.name, **model_kwargs(cfg, pretrained=False)).eval()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run '{name}': model '{cfg.model.name}' cannot be built from model.kwargs "
                          f"{cfg.model.kwargs}: {exc}") from None


def setting_cost(cfg: Config, name: str) -> dict[str, float]:
    """Parameters and thop GMACs (batch 1, eval mode, at data.preprocess.image_size) of a setting's model; building it
    checks the values of `model.kwargs`."""
    from utils.flops import model_cost

    return model_cost(build_setting_model(cfg, name), cfg.data.preprocess.in_channels, cfg.data.preprocess.image_size)


def latency_key(cfg: Config, overrides: Sequence[str]) -> dict:
    """What a latency figure depends on: a cached figure is reused only when all of it is the same."""
    return {"model": cfg.model.name, "kwargs": repr(sorted(cfg.model.kwargs.items())), "overrides": list(overrides),
            "image_size": cfg.data.preprocess.image_size, "in_channels": cfg.data.preprocess.in_channels,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def setting_latency(cfg: Config, name: str, warmup: int = 5, repeats: int = 20) -> dict[str, float]:
    """Median ms per batch of 1 and images/s at batch 8 (eager fp32 forward passes on the CPU)."""
    from utils.flops import latency_summary, time_forward

    torch.manual_seed(0)
    model = build_setting_model(cfg, name)
    figures: dict[str, float] = {}
    for batch in LATENCY_BATCHES:
        prep = cfg.data.preprocess
        images = torch.randn(batch, prep.in_channels, prep.image_size, prep.image_size)
        summary = latency_summary(time_forward(model, images, warmup, repeats), batch)
        figures[f"latency_b{batch}_ms"] = summary["latency_ms"]
        figures[f"img_s_b{batch}"] = summary["throughput_img_s"]
    return figures


def measure_latencies(settings: Sequence[tuple[str, Config, Sequence[str]]], out: Path) -> dict[str, dict]:
    """{setting: latency figures} for (name, config, overrides) of every setting, reusing `<out>/latency.json`
    where nothing it depends on changed; the file is rewritten with what was measured."""
    import json

    from utils.runs import write_json_atomic

    path = out / LATENCY_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        cached = {}  # a torn file: measure again
    measured = {}
    for name, cfg, overrides in settings:
        key = latency_key(cfg, overrides)
        entry = cached.get(name)
        if not (isinstance(entry, dict) and entry.get("key") == key):
            print(f"[sweep] timing {name}: batch {' and '.join(map(str, LATENCY_BATCHES))} at "
                  f"{cfg.data.preprocess.image_size} px, {key['threads']} threads")
            entry = {"key": key, **setting_latency(cfg, name)}
        measured[name] = entry
    write_json_atomic(measured, path)
    return {name: {k: v for k, v in entry.items() if k != "key"} for name, entry in measured.items()}


EXTERNAL_FIGURES = ("balanced_accuracy", "accuracy")


def external_figures(run_dir: Path, external: ExternalSet, bootstrap: int, show_progress: bool) -> dict:
    """Score the run's best.pth on the external set with test.py's pipeline (its report lands in the run
    directory); returns the headline classification figures with their intervals, or the reason there are
    none."""
    from evaluation.pipeline import TestOptions, run_test

    options = TestOptions(checkpoint=run_dir / "best.pth", split="test", data_root=external.root,
                          data_format=external.data_format, class_map=external.class_map,
                          data_opts=list(external.layout), bootstrap=bootstrap, show_progress=show_progress)
    try:
        metrics = run_test(options)
    except ConfigError as exc:  # e.g. a segmentation-only model on a classification set
        return {"name": external.name, "source": external.source, "error": str(exc)}
    intervals = metrics.get("ci95") or {}
    return {"name": external.name, "source": external.source, "folder": external.folder,
            "subset": metrics.get("headline_subset"), "num_images": metrics.get("num_images"),
            **{key: metrics.get(key) for key in EXTERNAL_FIGURES},
            "ci95": {key: intervals.get(key) for key in EXTERNAL_FIGURES}}


def external_is_current(result: Optional[dict], external: Optional[ExternalSet]) -> bool:
    """Whether a finished run's result already holds the figures of this external set."""
    if external is None:
        return True
    scored = (result or {}).get("external") or {}
    return scored.get("source") == external.source and scored.get("name") == external.name
