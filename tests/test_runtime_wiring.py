"""The runtime switch of test.py, `test.py --input`, the shift benchmark and the web demo: an exported runtime
scores like eager PyTorch, every report names it, its output folder is its own, INT8 results pair with the fp32
ones in `evaluation.compare`, and a runtime / precision that cannot run is one line and exit status 2."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation.conventions import output_folder_name
from tests.helpers import REPO, copy_test_images, save_untrained_checkpoint
from utils.cli import run_main
from utils.config import ConfigError, load_config

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _test_entry():
    spec = importlib.util.spec_from_file_location("test_entry", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tiny_brisc: Path, tmp_path_factory) -> Path:
    return save_untrained_checkpoint(tiny_brisc, tmp_path_factory.mktemp("run"))


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row.get("stem") or row["file"]: row for row in csv.DictReader(handle)}


def test_output_folder_names_carry_a_runtime_other_than_eager_fp32() -> None:
    names = {output_folder_name("val"), output_folder_name("val", runtime="onnxruntime"),
             output_folder_name("val", runtime="onnxruntime", precision="int8-dynamic"),
             output_folder_name("val", runtime="onnxruntime", precision="int8-static"),
             output_folder_name("val", runtime="torchscript")}
    assert len(names) == 5
    assert output_folder_name("val") == "test_val"
    assert output_folder_name("val", runtime="onnxruntime", precision="int8-dynamic") == \
        "test_val_onnxruntime-int8-dynamic"


def test_int8_on_another_runtime_than_onnxruntime_is_refused_in_the_config() -> None:
    with pytest.raises(ConfigError, match="eval.runtime_precision"):
        load_config("configs/demo.yaml", ["eval.runtime=torchscript", "eval.runtime_precision=int8-dynamic"])
    cfg = load_config("configs/demo.yaml", ["eval.runtime=onnxruntime", "eval.runtime_precision=int8-static"])
    assert (cfg.eval.runtime, cfg.eval.runtime_precision) == ("onnxruntime", "int8-static")
    assert load_config("configs/demo.yaml").eval.runtime == "torch"


@pytest.mark.parametrize("flags, named", [(["--runtime", "torchscript", "--precision", "int8-dynamic"], "onnxruntime"),
                                          (["--precision", "int8-static"], "onnxruntime"),
                                          (["--runtime", "tensorrt"], "invalid choice")])
def test_a_runtime_and_precision_that_cannot_run_is_one_line_and_exit_2(checkpoint: Path, tmp_path: Path, capsys,
                                                                        flags: list[str], named: str) -> None:
    entry = _test_entry()
    try:
        status = run_main(entry.main, ["--checkpoint", str(checkpoint), "--no-progress", "--device", "cpu",
                                       "--out", str(tmp_path / "never"), *flags])
    except SystemExit as exc:  # argparse's own refusal of an unknown choice
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_onnxruntime_scores_like_torch_names_itself_and_pairs_with_int8(checkpoint: Path, tmp_path: Path,
                                                                        capsys) -> None:
    entry = _test_entry()
    run_dir = checkpoint.parent
    common = ["--checkpoint", str(checkpoint), "--no-progress", "--device", "cpu", "--num-workers", "0",
              "--bootstrap", "0"]
    assert run_main(entry.main, common) == 0
    assert "runtime torch fp32 (eager PyTorch)" in capsys.readouterr().out
    assert run_main(entry.main, [*common, "--runtime", "onnxruntime"]) == 0
    console = capsys.readouterr().out
    assert "runtime onnxruntime fp32 (max |difference| from PyTorch" in console

    torch_dir, onnx_dir = run_dir / "test_test", run_dir / "test_test_onnxruntime"
    first = (torch_dir / "metrics.json").read_bytes()
    eager = json.loads((torch_dir / "metrics.json").read_text())
    exported = json.loads((onnx_dir / "metrics.json").read_text())
    assert (eager["runtime"], eager["runtime_precision"], eager["runtime_export"]) == ("torch", "fp32", None)
    assert (exported["runtime"], exported["runtime_precision"]) == ("onnxruntime", "fp32")
    parity = exported["runtime_export"]["parity"]
    assert parity["max_abs_diff"] <= parity["atol"] == 1e-4
    assert (run_dir / "exports" / exported["runtime_export"]["file"]).is_file()
    for key in ("accuracy", "f1_macro", "dice", "iou", "dice_train_res", "loss"):
        assert exported[key] == pytest.approx(eager[key], abs=1e-4), key
    a, b = _rows(torch_dir / "per_image.csv"), _rows(onnx_dir / "per_image.csv")
    assert list(a) == list(b) and len(a) == 16
    assert [r["pred_class"] for r in a.values()] == [r["pred_class"] for r in b.values()]

    # the INT8 run has a folder of its own and pairs with the fp32 one in evaluation.compare
    assert run_main(entry.main, [*common, "--runtime", "onnxruntime", "--precision", "int8-dynamic"]) == 0
    assert "runtime onnxruntime int8-dynamic (cls max |logit difference| from PyTorch" in capsys.readouterr().out
    int8_dir = run_dir / "test_test_onnxruntime-int8-dynamic"
    int8 = json.loads((int8_dir / "metrics.json").read_text())
    assert int8["runtime_precision"] == "int8-dynamic" and int8["runtime_export"]["parity"]["size_ratio_to_fp32"] < 1
    from evaluation.compare import main as compare_main

    assert run_main(compare_main, [str(torch_dir), str(int8_dir), "--subset", "all", "--bootstrap", "50",
                                   "--out", str(tmp_path / "paired")]) == 0
    paired = json.loads((tmp_path / "paired" / "compare.json").read_text())
    assert paired["num_images"] == 16 and paired["figures"]["accuracy"]["a"] == pytest.approx(eager["subsets"][
        "all"]["accuracy"])
    assert paired["figures"]["accuracy"]["b"] == pytest.approx(int8["subsets"]["all"]["accuracy"])
    assert (torch_dir / "metrics.json").read_bytes() == first  # the eager folder is left as it was


def test_folder_prediction_with_onnxruntime_equals_torch(checkpoint: Path, tiny_brisc: Path, tmp_path: Path,
                                                         capsys) -> None:
    entry = _test_entry()
    folder = copy_test_images(tiny_brisc, tmp_path / "in", count=3)
    (folder / "broken.png").write_text("not an image")
    common = ["--checkpoint", str(checkpoint), "--input", str(folder), "--device", "cpu", "--batch-size", "2"]
    assert run_main(entry.main, [*common, "--runtime", "torch", "--num-workers", "0",  # one batch after another
                                 "--out", str(tmp_path / "torch")]) == 1  # broken file
    assert run_main(entry.main, [*common, "--out", str(tmp_path / "onnx")]) == 1  # prediction's default on a CPU
    assert "runtime onnxruntime fp32" in capsys.readouterr().out
    eager, exported = _rows(tmp_path / "torch" / "predictions.csv"), _rows(tmp_path / "onnx" / "predictions.csv")
    assert list(eager) == list(exported) and len(eager) == 4
    assert eager["broken.png"]["status"] == exported["broken.png"]["status"] == "failed"
    for name, row in eager.items():
        if row["status"] != "ok":
            continue
        assert exported[name]["predicted_class"] == row["predicted_class"]
        for key in (k for k in row if k.startswith("p_")):
            assert float(exported[name][key]) == pytest.approx(float(row[key]), abs=1e-4)
        masks = [cv2.imread(str(tmp_path / run / "masks" / f"{Path(name).stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
                 for run in ("torch", "onnx")]
        assert masks[0].shape == masks[1].shape and np.mean(masks[0] != masks[1]) < 1e-3


def test_prediction_runtime_defaults_and_choices() -> None:
    from evaluation.predictor import prediction_runtime
    from utils.config import EvalConfig

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert prediction_runtime(EvalConfig(), None, None, cpu) == ("onnxruntime", "fp32", True)
    assert prediction_runtime(EvalConfig(), None, None, gpu) == ("torch", "fp32", True)  # eager on a GPU
    assert prediction_runtime(EvalConfig(), None, "int8-dynamic", gpu) == ("onnxruntime", "int8-dynamic", True)
    assert prediction_runtime(EvalConfig(), "torch", None, cpu) == ("torch", "fp32", False)  # a flag wins
    assert prediction_runtime(EvalConfig(predict_runtime="torchscript"), None, None, cpu) == ("torchscript", "fp32",
                                                                                              False)
    with pytest.raises(ConfigError, match="--runtime torch --precision int8-static"):
        prediction_runtime(EvalConfig(), "torch", "int8-static", cpu)


def test_an_automatic_runtime_that_cannot_export_falls_back_to_eager(checkpoint: Path, tiny_brisc: Path,
                                                                      tmp_path: Path, capsys, monkeypatch) -> None:
    import evaluation.predictor as predictor_module

    real = predictor_module.load_predictor

    def no_export(checkpoint, runtime, *args, **kwargs):
        if runtime != "torch":
            raise OSError("read-only file system: exports")
        return real(checkpoint, runtime, *args, **kwargs)

    monkeypatch.setattr(predictor_module, "load_predictor", no_export)
    entry = _test_entry()
    folder = copy_test_images(tiny_brisc, tmp_path / "in", count=2)
    common = ["--checkpoint", str(checkpoint), "--input", str(folder), "--device", "cpu"]
    assert run_main(entry.main, [*common, "--out", str(tmp_path / "auto")]) == 0
    printed = capsys.readouterr().out
    assert "the onnxruntime export is not available here (OSError: read-only" in printed
    assert "runtime torch fp32 (eager PyTorch)" in printed and (tmp_path / "auto" / "predictions.csv").is_file()
    # asked for by name, the same failure is an error (nothing predicted)
    with pytest.raises(OSError, match="read-only"):
        entry.main([*common, "--runtime", "onnxruntime", "--out", str(tmp_path / "named")])
    assert not (tmp_path / "named" / "predictions.csv").exists()


def test_a_batch_predicts_what_single_images_do(checkpoint: Path, tiny_brisc: Path, tmp_path: Path) -> None:
    from model.loading import load_model_from_checkpoint
    from model.runtime import load_predictor
    from prediction.folder import predict_batch, predict_image
    from datasets import DataError

    model, cfg, _ = load_model_from_checkpoint(checkpoint, "cpu")
    files = sorted((tiny_brisc / "classification_task" / "test" / "glioma").glob("*.jpg"))[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    predictor = load_predictor(checkpoint, "onnxruntime", cache_dir=tmp_path / "exports")
    for runner in (model, predictor):
        batch = predict_batch(runner, cfg, [files[0], bad, files[1], files[2]], threshold=0.4, tta=True)
        assert isinstance(batch[1], DataError) and len(batch) == 4
        for path, got in zip(files, (batch[0], batch[2], batch[3])):
            single = predict_image(model, cfg, path, threshold=0.4, tta=True)
            assert got.size == single.size and got.threshold == 0.4
            assert np.allclose(got.probabilities, single.probabilities, atol=1e-4)
            assert np.abs(got.tumour_probability - single.tumour_probability).max() < 1e-4
            assert torch.equal(got.model_input, single.model_input)


def test_the_shift_benchmark_runs_on_a_runtime_and_says_so(checkpoint: Path, tmp_path: Path) -> None:
    from evaluation.shift import run_shift_benchmark

    common = dict(split="test", shifts=["gamma"], severities=[2.0], device_name="cpu", num_workers=0,
                  show_progress=False)
    eager = run_shift_benchmark(checkpoint, out_dir=tmp_path / "torch", **common)
    exported = run_shift_benchmark(checkpoint, runtime="onnxruntime", **common)
    assert (eager["runtime"], exported["runtime"]) == ("torch", "onnxruntime")
    assert (checkpoint.parent / "shift_test_onnxruntime" / "shift.json").is_file()
    for key in ("accuracy", "dice"):
        assert exported["clean"][key] == pytest.approx(eager["clean"][key], abs=1e-4)
        assert exported["shifted"]["gamma"]["2"][key] == pytest.approx(eager["shifted"]["gamma"]["2"][key], abs=1e-4)


def test_prediction_timing_script_times_each_runtime_on_the_same_files(checkpoint: Path, tiny_brisc: Path,
                                                                       tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("prediction_timing", REPO / "scripts" / "prediction_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    images = tiny_brisc / "classification_task" / "test"
    assert run_main(timing.main, ["--checkpoint", str(checkpoint), "--images", str(images), "--count", "3",
                                  "--uploads", "2", "--repeats", "2", "--json", str(tmp_path / "t.json")]) == 0
    figures = json.loads((tmp_path / "t.json").read_text())
    assert figures["images"] == 3
    assert [(r["runtime"], r["workers"]) for r in figures["results"]] == [
        ("torch", 0), ("torch", "default"), ("onnxruntime", 0), ("onnxruntime", "default")]
    assert all(r["folder_s"] > 0 and r["upload_ms_median"] > 0 for r in figures["results"])
    assert all(len(r["folder_s_all"]) == 2 and min(r["folder_s_all"]) <= r["folder_s"] <= max(r["folder_s_all"])
               for r in figures["results"])
    assert "| onnxruntime | default |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no images of 12345x12345 pixels"):
        timing.image_files(images, 5, side=12345)


@pytest.mark.parametrize("runtime,workers", [("torch", 1), ("torch", 3), ("onnxruntime", 3)])
def test_threaded_folder_prediction_writes_what_the_serial_one_writes(checkpoint: Path, tiny_brisc: Path,
                                                                       tmp_path: Path, runtime: str,
                                                                       workers: int) -> None:
    """Batches in flight in threads (ONNX Runtime then on one thread per call here) change the speed only: same
    CSV, same mask files, and an unreadable file still listed in order."""
    from prediction.folder import predict_folder

    folder = tmp_path / "in"
    shutil.copytree(tiny_brisc / "classification_task" / "test" / "glioma", folder)
    (folder / "0_broken.png").write_bytes(b"not a png")
    serial = predict_folder(checkpoint, folder, tmp_path / "serial", "cpu", runtime=runtime, batch_size=2, workers=0)
    threaded = predict_folder(checkpoint, folder, tmp_path / "threaded", "cpu", runtime=runtime, batch_size=2,
                              workers=workers)
    assert serial == threaded == ["0_broken.png"]
    csv_of = lambda name: (tmp_path / name / "predictions.csv").read_text().splitlines()
    assert csv_of("serial") == csv_of("threaded") and len(csv_of("serial")) == 1 + len(list(folder.iterdir()))
    masks = sorted(p.name for p in (tmp_path / "serial" / "masks").iterdir())
    assert masks == sorted(p.name for p in (tmp_path / "threaded" / "masks").iterdir()) and masks
    for name in masks:
        a = cv2.imread(str(tmp_path / "serial" / "masks" / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "threaded" / "masks" / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_in_flight_come_back_in_order_and_an_error_stops_the_rest(workers: int) -> None:
    import random
    import threading
    import time

    from prediction.folder import _in_order

    started, lock = [], threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(random.Random(item).random() / 200)  # finishing out of order
        if item == 5 and fail:
            raise OSError("disk full")
        return item * item

    fail = False
    assert list(_in_order(work, range(12), workers)) == [i * i for i in range(12)]
    started.clear()
    fail = True
    with pytest.raises(OSError, match="disk full"):
        list(_in_order(work, range(40), workers))
    time.sleep(0.05)
    assert 5 in started and len(started) <= 5 + 2 * workers + 1  # what was queued behind the error never ran
