"""benchmark.py: a tiny CPU run end to end, the derived ratios, and the join of test.py metrics."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import benchmark
from tests.helpers import REPO, run_entry
from utils.errors import UserError


def test_cpu_run_writes_table_csv_json_and_radar(tmp_path: Path):
    out = tmp_path / "bench"
    proc = run_entry(["benchmark.py", "--models", "light_unet", "efficient_mtnet", "--device", "cpu",
                      "--image-size", "64", "--batch-sizes", "1", "--repeats", "2", "--warmup", "1",
                      "--threads", "1", "--out", str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Benchmark on CPU" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == ["Model", "light_unet", "efficient_mtnet"]

    with open(out / "benchmark.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["light_unet", "efficient_mtnet"]
    assert all(r["env_device"] == "CPU" and r["batch_size"] == "1" and r["precision"] == "fp32" for r in rows)

    report = json.loads((out / "benchmark.json").read_text())
    assert report["environment"]["device"] == "CPU" and report["environment"]["torch_threads"] == 1
    light, emt = report["rows"]
    assert light["params"] == 1_928_037 and light["peak_memory_mb"] is None
    assert light["gflops_thop"] == pytest.approx(2 * light["gmacs_thop"])
    assert light["gflops_flopcounter"] == pytest.approx(light["gflops_thop"], rel=0.05)
    assert max(r["efficiency_ratio"] for r in report["rows"]) == 1.0
    assert max(r["speed_ratio"] for r in report["rows"]) == 1.0
    assert all(r["latency_ms"] > 0 and r["throughput_img_s"] == pytest.approx(1000 / r["latency_ms"])
               for r in report["rows"])
    assert (out / "radar.png").read_bytes()[:4] == b"\x89PNG"


def _row(model: str, params: int, fps: float, batch: int = 1) -> dict:
    return {"model": model, "params": params, "gmacs_thop": params / 1e6, "gflops_thop": 2 * params / 1e6,
            "gflops_flopcounter": 2 * params / 1e6, "throughput_img_s": fps, "latency_ms": 1000 * batch / fps,
            "batch_size": batch, "precision": "fp32", "image_size": 64, "peak_memory_mb": None}


def test_ratios_are_normalised_per_batch_size():
    rows = [_row("a", 1_000_000, 50.0), _row("b", 4_000_000, 100.0), _row("a", 1_000_000, 400.0, batch=8),
            _row("b", 4_000_000, 200.0, batch=8)]
    benchmark.add_ratios(rows)
    assert [r["efficiency_ratio"] for r in rows] == [1.0, 0.25, 1.0, 0.25]
    assert [r["speed_ratio"] for r in rows] == [0.5, 1.0, 1.0, 0.5]


def test_metrics_join_table_and_radar(tmp_path: Path, capsys):
    (tmp_path / "run_a").mkdir()
    (tmp_path / "run_b").mkdir()
    (tmp_path / "run_a" / "metrics.json").write_text(json.dumps(
        {"model": "a", "params": 1, "accuracy": 0.9875, "f1_macro": 0.98, "dice": 0.8, "miou_2class": 0.85,
         "confusion_matrix": [[1, 0], [0, 1]]}))
    (tmp_path / "run_b" / "metrics.json").write_text(json.dumps({"model": "b", "accuracy": 0.5}))  # keys missing
    (tmp_path / "stray.json").write_text(json.dumps({"accuracy": 0.1}))  # no model name: skipped with a warning
    metrics = benchmark.load_metrics([str(tmp_path / "*" / "metrics.json"), str(tmp_path / "stray.json")])
    assert set(metrics) == {"a", "b"} and "skipping" in capsys.readouterr().err

    rows = [_row("a", 1_000_000, 50.0), _row("b", 4_000_000, 100.0)]
    benchmark.add_ratios(rows)
    benchmark.join_metrics(rows, metrics)
    env = {"device": "CPU", "device_name": "test cpu", "torch": "x", "torch_threads": 1, "image_size": 64,
           "precision": ["fp32"], "channels_last": False, "compiled": False, "repeats": 2, "warmup": 1}
    table = benchmark.markdown_table(rows, env, with_metrics=True)
    row_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    row_b = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert "98.75" in row_a and "85.00" in row_a and "80.00" in row_a
    assert row_b.count("n/a") == 4  # peak memory on a CPU, mIoU, Dice, F1
    benchmark.draw_radar(rows, tmp_path / "radar.png", with_metrics=True)
    assert (tmp_path / "radar.png").stat().st_size > 10_000

    with pytest.raises(UserError, match="no metrics.json"):  # run_main prints it as one line, exit 2
        benchmark.load_metrics([str(tmp_path / "nothing" / "*.json")])
