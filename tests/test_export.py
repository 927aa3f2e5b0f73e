"""model.export: ONNX and TorchScript files reproduce PyTorch, the command's checks and errors, and
benchmark.py's exported-runtime rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from utils.cli import run_main
import torch

import benchmark
from model import build_model
from model import export
from tests.helpers import REPO, run_entry
from utils.checkpoint import atomic_save
from utils.config import Config, config_to_dict

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _checkpoint(path: Path, image_size: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("efficient_mtnet", num_classes=4, in_channels=3, deep_supervision=True)
    cfg = Config()
    cfg.data.preprocess.image_size = image_size
    atomic_save({"format_version": 1, "model_name": "efficient_mtnet", "config": config_to_dict(cfg),
                 "model": model.state_dict(), "ema": None}, path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_file_reproduces_pytorch_at_two_sizes_and_batch_sizes(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    model = build_model("efficient_mtnet", num_classes=4, deep_supervision=True).eval()
    path = export.export_model(model, tmp_path / f"m.{fmt}", fmt, torch.randn(1, 3, 64, 64), dynamic=True)
    runner = export.load_runner(path, fmt)
    for shape in [(1, 3, 64, 64), (3, 3, 48, 80)]:  # another batch size, non-square, not a multiple of 32
        image = torch.randn(*shape)
        with torch.no_grad():
            expected = model(image)
        cls, seg = runner(image)
        assert cls.shape == (shape[0], 4) and seg.shape == (shape[0], 1, *shape[2:])
        np.testing.assert_allclose(cls, expected["cls"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(seg, expected["seg"].numpy(), atol=1e-4, rtol=0)
    # the inference path only: two outputs, no deep-supervision head weights in the file
    if fmt == "onnx":
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        assert [o.name for o in proto.graph.output] == ["cls", "seg"]
        assert not [i.name for i in proto.graph.initializer if "aux" in i.name]
    else:
        module = torch.jit.load(str(path))
        # frozen: the used weights are constants of the graph; no submodule (so no unused head) is left
        assert [name for name, _ in module.named_modules()] == [""] and not module.state_dict()


class _WidthBakedIn(torch.nn.Module):
    """A model whose trace does not generalise: a Python float taken from the input width becomes a constant."""

    def forward(self, x: torch.Tensor) -> dict:
        return {"cls": x.mean((2, 3)), "seg": x[:, :1] * float(x.shape[-1])}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_non_square_check_catches_a_trace_that_does_not_generalise(tmp_path: Path, fmt: str) -> None:
    model = _WidthBakedIn()
    square, non_square = export.check_inputs(3, 64, 64, batch=1, dynamic=True)
    assert non_square.shape == (2, 3, 64, 40)
    path = export.export_model(model, tmp_path / f"m.{fmt}", fmt, square)
    runner = export.load_runner(path, fmt)
    assert export.check_export(runner, model, [square], 1e-4, fmt) < 1e-6  # right at the traced shape
    with pytest.raises(export.ExportError, match=r"does not reproduce PyTorch on input \(2, 3, 64, 40\)"):
        export.check_export(runner, model, [square, non_square], 1e-4, fmt)


def test_command_writes_checks_and_times_the_file(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "best.pth")
    assert export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--repeats", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "best.onnx").is_file()
    assert "dynamic batch and image size" in out and "MiB" in out
    assert "1x3x64x64 and 2x3x64x40" in out  # the check ran on a non-square input at another batch size
    assert "PyTorch" in out and "ONNX Runtime (CPU)" in out and "ms" in out
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "best.onnx")).metadata_props}
    assert metadata["image_size"] == "64" and json.loads(metadata["mean"]) == [0.485, 0.456, 0.406]

    assert export.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--repeats", "1"]) == 0
    extra = {"metadata.json": ""}
    torch.jit.load(str(tmp_path / "best.pt"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["threshold"] == "0.5"

    fixed = tmp_path / "fixed" / "m.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--no-dynamic", "--image-size", "48", "64",
                        "--out", str(fixed), "--repeats", "1", "--warmup", "0"]) == 0
    dims = onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 48, 64]
    with pytest.raises(SystemExit):
        export.parse_args(["--checkpoint", str(ckpt), "--format", "torchscript", "--no-dynamic"])


def test_an_export_that_does_not_reproduce_pytorch_is_an_error_and_removed(tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    ckpt = _checkpoint(tmp_path / "best.pth")
    real_runner = export.load_runner

    def drifting_runner(path: Path, fmt: str, threads: int = 0) -> export.Runner:
        run = real_runner(path, fmt, threads)
        return lambda image: tuple(a + 1e-3 for a in run(image))  # e.g. a runtime with a wrong kernel

    earlier = tmp_path / "best.pt"
    earlier.write_bytes(b"an earlier export")
    monkeypatch.setattr(export, "load_runner", drifting_runner)
    assert run_main(export.main, ["--checkpoint", str(ckpt), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the torchscript file does not reproduce PyTorch") and "\n" not in err
    assert earlier.read_bytes() == b"an earlier export"  # neither replaced by the bad file nor deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pth"]


def test_bad_checkpoint_or_format_gives_one_line(tmp_path: Path, capsys) -> None:
    proc = run_entry(["-m", "model.export", "--checkpoint", str(tmp_path / "missing.pth"), "--format", "onnx"],
                     cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: checkpoint '{tmp_path / 'missing.pth'}' does not exist"

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")  # torch.load's own error here is eight lines long
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(_checkpoint(tmp_path / "whole.pth").read_bytes()[:100_000])
    for bad, says in ((broken, f"error: '{broken}' is not a PyTorch checkpoint"),
                      (truncated, f"error: checkpoint '{truncated}' is not a complete torch.save archive")):
        assert run_main(export.main, ["--checkpoint", str(bad), "--format", "onnx"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(says) and "\n" not in err
        assert not bad.with_suffix(".onnx").exists()

    foreign = torch.load(_checkpoint(tmp_path / "other.pth"), weights_only=True)
    foreign["config"]["model"]["name"] = "efficient_mtnet_v9"  # saved by a version with another model
    atomic_save(foreign, tmp_path / "foreign.pth")
    assert run_main(export.main, ["--checkpoint", str(tmp_path / "foreign.pth"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint '{tmp_path / 'foreign.pth'}' holds a model this version cannot build")
    assert "'efficient_mtnet_v9' is not a registered model" in err and "\n" not in err

    with pytest.raises(SystemExit) as exit_info:
        export.parse_args(["--checkpoint", str(broken), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_benchmark_adds_an_onnxruntime_row(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = run_entry(["benchmark.py", "--models", "efficient_mtnet", "--device", "cpu", "--image-size", "64",
                      "--batch-sizes", "1", "2", "--repeats", "2", "--warmup", "1", "--threads", "1",
                      "--runtime", "onnxruntime", "--allocator", "default", "--out", str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    main_table = proc.stdout.split("\nRuntimes of ")[0]  # the runtime table of model.runtime_bench follows it
    lines = [line.split("|") for line in main_table.splitlines() if line.startswith("| ")]
    batch, runtime = [[cell.strip() for cell in lines[0]].index(name) for name in ("Batch", "Runtime")]
    assert [(cells[batch].strip(), cells[runtime].strip()) for cells in lines[1:]] == [
        ("1", "torch"), ("2", "torch"), ("1", "onnxruntime"), ("2", "onnxruntime")]
    assert "onnxruntime" in proc.stdout.splitlines()[0]
    report = json.loads((out / "benchmark.json").read_text())
    assert report["environment"]["cpu_allocator"] == "default"  # glibc left as it is when asked
    rows = report["rows"]
    exported = [r for r in rows if r["runtime"] == "onnxruntime"]
    assert all(r["max_abs_diff"] < 1e-4 and r["file_mb"] > 1 and r["latency_ms"] > 0 for r in exported)
    assert all(r["speed_ratio"] == 1.0 for r in rows)  # one model: fastest of its own runtime and batch size
    # the runtime x precision x size x batch table, eager PyTorch beside the export, against a peak of this run
    table = report["runtime_tables"]["efficient_mtnet"]
    assert table["weights"] == "random" and table["peak_gflops"] == report["environment"]["matmul_peak_gflops"] > 0
    assert [(r["runtime"], r["batch"]) for r in table["rows"]] == [("torch", 1), ("torch", 2), ("onnxruntime", 1),
                                                                    ("onnxruntime", 2)]
    assert all(0 < r["peak_share"] for r in table["rows"])
    assert "Runtimes of efficient_mtnet (random weights" in proc.stdout and "| onnxruntime | fp32 | 64 | 2 |" in \
        proc.stdout and "Peak share" in (out / "runtime_table.md").read_text()


def test_benchmark_int8_needs_onnxruntime(tmp_path: Path) -> None:
    proc = run_entry(["benchmark.py", "--models", "efficient_mtnet", "--device", "cpu", "--runtime", "torchscript",
                      "--runtime-precision", "int8-dynamic", "--out", str(tmp_path)], cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: --runtime-precision int8-dynamic runs on ONNX "
                                                            "Runtime only: add --runtime onnxruntime")


def test_speed_ratio_compares_within_a_runtime() -> None:
    def row(model: str, runtime: str, fps: float) -> dict:
        return {"model": model, "params": 1, "gmacs_thop": 1.0, "batch_size": 1, "precision": "fp32",
                "runtime": runtime, "throughput_img_s": fps}

    rows = [row("a", "torch", 50.0), row("b", "torch", 100.0), row("a", "onnxruntime", 400.0),
            row("b", "onnxruntime", 200.0)]
    benchmark.add_ratios(rows)
    assert [r["speed_ratio"] for r in rows] == [0.5, 1.0, 1.0, 0.5]
