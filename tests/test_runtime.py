"""model.runtime: every runtime reproduces eager PyTorch, exports are cached and redone when the checkpoint
changes, INT8 runs and says so, chunked batches equal one big batch, and the predictor fits the model contract."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from evaluation.inference import predict
from model import model_tasks
from model import export
from model import runtime as rt
from model.loading import load_model_from_checkpoint
from tests.helpers import REPO, run_entry, save_untrained_checkpoint
from utils.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    save_untrained_checkpoint(folder / "no-data", folder)  # 64 px demo model; the data root is not read
    return folder


def _images(batch: int = 3, height: int = 64, width: int = 80, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _eager(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    model, _, _ = load_model_from_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        return model, model(_images())


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "torchscript"])
def test_each_runtime_reproduces_eager_pytorch(run_dir: Path, runtime: str, one_thread) -> None:
    _, expected = _eager(run_dir / "best.pth")
    predictor = rt.load_predictor(run_dir / "best.pth", runtime, cache_dir=run_dir / f"cache-{runtime}")
    assert predictor.runtime == runtime and predictor.precision == "fp32"
    out = predictor(_images())  # batch 3, non-square, 80 px wide: neither the export's batch nor its size
    assert set(out) == {"cls", "seg"} and out["seg"].shape == (3, 1, 64, 80)
    for key in out:
        torch.testing.assert_close(out[key], expected[key], atol=rt.EXPORT_ATOL, rtol=0)
    if runtime != "torch":
        record = json.loads(next((run_dir / f"cache-{runtime}").glob("*.json")).read_text())
        assert record["parity"]["max_abs_diff"] < rt.EXPORT_ATOL
        assert record["key"]["checkpoint_sha256"] and record["key"]["precision"] == "fp32"


def test_the_predictor_fits_the_model_contract(run_dir: Path, one_thread) -> None:
    model, _ = _eager(run_dir / "best.pth")
    predictor = rt.load_predictor(run_dir / "best.pth", "onnxruntime", cache_dir=run_dir / "cache-contract")
    assert model_tasks(predictor) == model_tasks(model) == ("cls", "seg")
    assert predictor.eval() is predictor and not predictor.training
    with pytest.raises(InputError, match="inference only"):
        predictor.train()
    # the evaluation loop's forward (flip TTA included) takes a predictor where it took the model
    with torch.no_grad():
        expected = predict(model, _images(), tta=True)
    got = predict(predictor, _images(), tta=True)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)


def test_export_is_cached_and_redone_when_the_checkpoint_changes(run_dir: Path, tmp_path: Path, one_thread) -> None:
    checkpoint = tmp_path / "best.pth"
    checkpoint.write_bytes((run_dir / "best.pth").read_bytes())
    first = rt.load_predictor(checkpoint, "onnxruntime")
    assert not first.info["cached"] and Path(first.info["path"]).parent == tmp_path / "exports"
    def no_eager_model(*args, **kwargs):
        raise AssertionError("a cached export was loaded by building the eager model")

    with pytest.MonkeyPatch.context() as patch:  # a cached export loads from its file and record alone
        patch.setattr(rt, "model_from_checkpoint", no_eager_model)
        again = rt.load_predictor(checkpoint, "onnxruntime")
    assert again.info["cached"] and again.info["path"] == first.info["path"] and again.tasks == first.tasks
    torch.testing.assert_close(again(_images())["seg"], first(_images())["seg"], atol=0, rtol=0)

    # new weights under the same name: the old export no longer describes them
    saved = torch.load(checkpoint, weights_only=True)
    saved["model"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in saved["model"].items()}
    torch.save(saved, checkpoint)
    changed = rt.load_predictor(checkpoint, "onnxruntime")
    assert not changed.info["cached"] and changed.info["path"] != first.info["path"]
    assert not Path(first.info["path"]).exists()  # the superseded export is removed
    model, _, _ = load_model_from_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        expected = model(_images())
    torch.testing.assert_close(changed(_images())["seg"], expected["seg"], atol=rt.EXPORT_ATOL, rtol=0)
    # the runtime and the weights are part of the key too: these files live side by side
    rt.load_predictor(checkpoint, "torchscript")
    raw = rt.load_predictor(checkpoint, "onnxruntime", use_ema=False)
    assert not raw.info["cached"] and raw.info["path"] != changed.info["path"]
    assert rt.load_predictor(checkpoint, "onnxruntime").info["cached"]  # the raw export did not replace it
    assert len(list((tmp_path / "exports").glob("*.onnx"))) == 2 and len(list((tmp_path / "exports").glob("*.pt"))) == 1


def test_an_export_that_does_not_reproduce_pytorch_is_refused(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real = export.load_runner
    monkeypatch.setattr(export, "load_runner",
                        lambda path, fmt, threads=0: (lambda x: tuple(a + 1e-3 for a in real(path, fmt)(x))))
    with pytest.raises(rt.RuntimeMismatchError, match="does not reproduce PyTorch"):
        rt.load_predictor(run_dir / "best.pth", "onnxruntime", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-checked left to be picked up later


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-static"])
def test_int8_runs_reports_its_precision_and_is_smaller(run_dir: Path, tmp_path: Path, precision: str,
                                                         one_thread) -> None:
    calibration = [_images(4, 64, 64, seed=s) for s in range(3)]
    predictor = rt.load_predictor(run_dir / "best.pth", "onnxruntime", precision=precision, cache_dir=tmp_path,
                                  calibration=calibration)
    assert predictor.runtime == "onnxruntime" and predictor.precision == precision
    parity = predictor.info["parity"]
    assert parity["quantised_nodes"] > 0 and parity["size_ratio_to_fp32"] < 0.5  # int8 weights: about a quarter
    assert parity["calibration_images"] == (12 if precision == "int8-static" else 0)
    assert 0.9 <= parity["mask_pixel_agreement"] <= 1 and parity["seg_relative_error"] <= 0.25
    _, expected = _eager(run_dir / "best.pth")
    out = predictor(_images())
    assert out["seg"].shape == expected["seg"].shape and torch.isfinite(out["seg"]).all()
    # close to fp32 but not equal: int8 is really in use
    difference = (out["seg"] - expected["seg"]).abs().max().item()
    assert 0 < difference < 0.25 * float(expected["seg"].max() - expected["seg"].min())


def test_bad_runtime_precision_and_missing_calibration_are_one_line_errors(run_dir: Path) -> None:
    cases = [({"runtime": "tensorrt"}, "runtime 'tensorrt' is not one of torch, onnxruntime, torchscript"),
             ({"precision": "int4"}, "precision 'int4' is not one of"),
             ({"runtime": "torchscript", "precision": "int8-dynamic"}, "runs on runtime 'onnxruntime' only"),
             ({"runtime": "onnxruntime", "precision": "int8-static"}, "needs calibration images")]
    for kwargs, says in cases:
        with pytest.raises(InputError, match=says.replace("(", r"\(")):
            rt.load_predictor(run_dir / "best.pth", **kwargs)


def test_chunking_splits_by_the_pixel_budget_and_gives_the_big_batch_outputs(run_dir: Path, one_thread) -> None:
    assert rt.chunk_size(8, 256, 256, rt.DEFAULT_PIXEL_BUDGET) == 8
    assert rt.chunk_size(8, 512, 512, rt.DEFAULT_PIXEL_BUDGET) == 2
    assert rt.chunk_size(8, 640, 640, rt.DEFAULT_PIXEL_BUDGET) == 1
    assert rt.chunk_size(8, 640, 640, None) == 8 and rt.chunk_size(3, 64, 64, 10) == 1
    model, _ = _eager(run_dir / "best.pth")
    seen = []

    def forward(images: torch.Tensor) -> dict:
        seen.append(images.shape[0])
        return model(images)

    images = _images(7)
    with torch.no_grad():
        whole = model(images)
        chunked = rt.predict_in_chunks(forward, images, pixel_budget=3 * 64 * 80)
    assert seen == [3, 3, 1]
    for key in ("cls", "seg"):  # eval mode is per image: the same numbers, up to kernel summation order
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-6, rtol=0)
    # the predictor chunks by itself
    predictor = rt.load_predictor(run_dir / "best.pth", "torch", pixel_budget=2 * 64 * 80)
    torch.testing.assert_close(predictor(images)["seg"], whole["seg"], atol=1e-6, rtol=0)


def test_a_single_task_run_exports_its_one_output(tiny_brisc: Path, tmp_path: Path, one_thread) -> None:
    checkpoint = save_untrained_checkpoint(tiny_brisc, tmp_path)
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["loss"]["cls_weight"] = 0.0  # a segmentation-only run of the two-head model
    torch.save(saved, checkpoint)
    predictor = rt.load_predictor(checkpoint, "onnxruntime")
    assert predictor.tasks == ("seg",)
    assert rt.load_predictor(checkpoint, "onnxruntime").tasks == ("seg",)  # from the cached export's record
    out = predictor(_images())
    assert set(out) == {"seg"}
    model, _, _ = load_model_from_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(out["seg"], model(_images())["seg"], atol=rt.EXPORT_ATOL, rtol=0)


def test_calibration_draws_from_the_runs_training_split(tiny_brisc: Path, tmp_path: Path, one_thread) -> None:
    from datasets import build_train_val
    from datasets.calibration import TrainCalibration
    from utils.checkpoint import config_of, read_checkpoint

    checkpoint = save_untrained_checkpoint(tiny_brisc, tmp_path)
    cfg = config_of(read_checkpoint(checkpoint))
    build_train_val(cfg.data, tmp_path / "split.json", verbose=False)  # writes the run's split.json
    calibration = TrainCalibration(checkpoint, count=10, batch_size=4)
    batches = list(calibration)
    assert [b.shape for b in batches] == [(4, 3, 64, 64), (4, 3, 64, 64), (2, 3, 64, 64)]
    assert TrainCalibration(checkpoint, count=10, seed=1).key != calibration.key
    predictor = rt.load_predictor(checkpoint, "onnxruntime", precision="int8-static", calibration=calibration)
    assert predictor.info["parity"]["calibration_images"] == 10 and predictor.precision == "int8-static"
    (tmp_path / "split.json").unlink()
    with pytest.raises(Exception, match="split file"):
        TrainCalibration(checkpoint)


def test_a_notebook_gets_the_kept_allocator_from_the_first_cpu_forward(run_dir: Path) -> None:
    script = ("import json, torch; from model.runtime import load_predictor; from utils.allocator import "
              "allocator_state; p = load_predictor(%r, 'torch'); before = allocator_state(); "
              "p(torch.randn(1, 3, 64, 64)); print(json.dumps([before, allocator_state()]))"
              % str(run_dir / "best.pth"))
    proc = run_entry(["-c", script], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before == "default"  # loading alone changes nothing; the first CPU forward does
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert after.startswith("glibc, freed memory kept")


def test_runtime_table_has_a_row_per_combination_and_a_measured_peak(run_dir: Path, tmp_path: Path,
                                                                    one_thread) -> None:
    from model.runtime_bench import markdown, matmul_peak_gflops, runtime_table

    assert matmul_peak_gflops(size=128, repeats=2) > 0
    table = runtime_table(run_dir / "best.pth", runtimes=("torch", "onnxruntime"),
                          precisions=("fp32", "int8-dynamic", "int8-static"), batch_sizes=(1, 3), sizes=(64,),
                          pixel_budgets=(-1, 64 * 64), warmup=0, repeats=1, cache_dir=tmp_path)
    combos = [(r["runtime"], r["precision"], r["images_per_forward"], r["batch"]) for r in table["rows"]]
    # INT8 only on onnxruntime; int8-static skipped without calibration images, and said so
    assert combos == [("torch", "fp32", 1, 1), ("torch", "fp32", 3, 3), ("torch", "fp32", 1, 1),
                      ("torch", "fp32", 1, 3), ("onnxruntime", "fp32", 1, 1), ("onnxruntime", "fp32", 3, 3),
                      ("onnxruntime", "fp32", 1, 1), ("onnxruntime", "fp32", 1, 3),
                      ("onnxruntime", "int8-dynamic", 1, 1), ("onnxruntime", "int8-dynamic", 3, 3),
                      ("onnxruntime", "int8-dynamic", 1, 1), ("onnxruntime", "int8-dynamic", 1, 3)]
    assert table["notes"] == ["int8-static skipped: no calibration images given"]
    model, _, _ = load_model_from_checkpoint(run_dir / "best.pth", "cpu")
    from utils.flops import flop_counter_flops

    for row in table["rows"]:
        assert row["gflop_per_image"] == pytest.approx(flop_counter_flops(model, torch.zeros(1, 3, 64, 64)) / 1e9)
        assert row["per_image_ms"] == pytest.approx(row["latency_ms"] / row["batch"])
        assert row["peak_share"] == pytest.approx(row["achieved_gflops"] / table["peak_gflops"])
        assert row["achieved_gflops"] == pytest.approx(row["gflop_per_image"] * row["throughput_img_s"])
    text = markdown(table)
    assert text.count("\n| onnxruntime | int8-dynamic | 64 |") == 4 and "matmul peak" in text
