"""benchmark.py: a tiny CPU run end to end, the derived ratios, and the join of test.py metrics."""
from __future__ import annotations

import csv
import json
import platform
import sys
from pathlib import Path

import pytest

import benchmark
from tests.helpers import REPO, run_entry
from utils.errors import UserError


def test_cpu_run_writes_table_csv_json_and_radar(tmp_path: Path):
    out = tmp_path / "bench"
    proc = run_entry(["benchmark.py", "--models", "light_unet", "efficient_mtnet", "--device", "cpu",
                      "--image-size", "64", "32", "--batch-sizes", "1", "2", "--repeats", "2", "--warmup", "1",
                      "--threads", "1", "--out", str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Benchmark on CPU" in proc.stdout and "input 64x64, 32x32" in proc.stdout
    table = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0]]
    cells = [{name: cell.strip() for name, cell in zip(header, line)} for line in table[1:]]
    # one row per model, input size and batch size, in the order given
    assert [(c["Model"], c["Input px"], c["Batch"]) for c in cells] == [
        (model, size, batch) for model in ("light_unet", "efficient_mtnet") for size in ("64", "32")
        for batch in ("1", "2")]
    assert all(float(c["ms / image"]) == pytest.approx(float(c["Latency ms (median)"]) / int(c["Batch"]), abs=0.01)
               for c in cells)

    with open(out / "benchmark.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["light_unet"] * 4 + ["efficient_mtnet"] * 4
    assert all(r["env_device"] == "CPU" and r["precision"] == "fp32" for r in rows)

    report = json.loads((out / "benchmark.json").read_text())
    env = report["environment"]
    assert env["device"] == "CPU" and env["torch_threads"] == 1 and env["image_sizes"] == [64, 32]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert env["cpu_allocator"] == "glibc, freed memory kept up to 1024 MiB"
    light, small = report["rows"][0], report["rows"][2]
    assert light["params"] == 1_928_037 and light["peak_memory_mb"] is None
    assert light["gflops_thop"] == pytest.approx(2 * light["gmacs_thop"])
    assert light["gflops_flopcounter"] == pytest.approx(light["gflops_thop"], rel=0.05)
    # operations are counted at each size: a plain convolutional network costs 4x at twice the side
    assert (small["image_size"], small["params"]) == (32, light["params"])
    assert light["gmacs_thop"] == pytest.approx(4 * small["gmacs_thop"], rel=0.01)
    assert max(r["efficiency_ratio"] for r in report["rows"]) == 1.0
    for size, batch in [(64, 1), (64, 2), (32, 1), (32, 2)]:  # the fastest of each input and batch size is 1
        assert max(r["speed_ratio"] for r in report["rows"]
                   if (r["image_size"], r["batch_size"]) == (size, batch)) == 1.0
    assert all(r["latency_ms"] > 0 and r["throughput_img_s"] == pytest.approx(1000 * r["batch_size"] / r["latency_ms"])
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


def test_speed_and_compute_ratios_compare_at_the_same_input_size():
    rows = [_row("a", 1_000_000, 50.0), _row("b", 4_000_000, 100.0), _row("a", 1_000_000, 10.0),
            _row("b", 4_000_000, 5.0)]
    for r in rows[2:]:  # the same models at 4x the pixels: 4x the MACs, slower
        r.update(image_size=128, gmacs_thop=4 * r["gmacs_thop"])
    benchmark.add_ratios(rows)
    assert [r["speed_ratio"] for r in rows] == [0.5, 1.0, 1.0, 0.5]
    assert [r["compute_ratio"] for r in rows] == [1.0, 0.25, 1.0, 0.25]  # not 0.25 / 0.0625 against the 64 px rows


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
    env = {"device": "CPU", "device_name": "test cpu", "torch": "x", "torch_threads": 1, "image_sizes": [64],
           "precision": ["fp32"], "channels_last": False, "compiled": False, "repeats": 2, "warmup": 1}
    table = benchmark.render_table(rows, env, with_metrics=True)
    row_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    row_b = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert "98.75" in row_a and "85.00" in row_a and "80.00" in row_a
    assert row_b.count("n/a") == 5  # peak memory on a CPU, macro-F1, Dice, IoU, mIoU
    benchmark.draw_radar(rows, tmp_path / "radar.png", with_metrics=True)
    assert (tmp_path / "radar.png").stat().st_size > 10_000

    with pytest.raises(UserError, match="no metrics.json"):  # run_main prints it as one line, exit 2
        benchmark.load_metrics([str(tmp_path / "nothing" / "*.json")])
