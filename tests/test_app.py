"""The web demo's logic without a browser: the page's prediction equals `test.py --input` on the same file,
uploads it must refuse with a message, checkpoint discovery, and what the page derives from a prediction."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets.errors import DataError
from prediction import demo
from prediction.folder import predict_image
from model import build_model
from model.loading import load_model_from_checkpoint, model_kwargs
from tests.helpers import REPO
from utils.checkpoint import atomic_save
from utils.cli import run_main
from utils.config import config_from_dict, config_to_dict


def _load_entry(name: str):
    spec = importlib.util.spec_from_file_location(f"entry_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_test_checkpoint(path: Path, model_name: str = "efficient_mtnet", steps: int = 0) -> Path:
    """A small EfficientMTNet (64 px input) fitted for `steps` Adam steps to the page's four example slices,
    so that its class and mask depend on the image (an untrained one answers 0.25 for every class)."""
    from datasets.synthetic import render
    from datasets.transforms import load_image_for_inference

    torch.manual_seed(0)
    cfg = config_from_dict({"data": {"preprocess": {"image_size": 64}}})
    model = build_model(cfg.model.name, **model_kwargs(cfg))
    if steps:
        images, masks = [], []
        for label in range(4):  # the examples' own pixels and masks (demo.ensure_examples renders the same)
            grey, mask = render(np.random.default_rng([demo.EXAMPLE_SEED, label]), label, "ax", demo.EXAMPLE_SIZE)
            images.append(load_image_for_inference(grey, cfg.data)[0])
            masks.append(torch.from_numpy(cv2.resize(mask.astype(np.float32), (64, 64)) >= 0.5).float()[None])
        images, masks, labels = torch.stack(images), torch.stack(masks), torch.arange(4)
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            out = model(images)
            loss = (torch.nn.functional.cross_entropy(out["cls"], labels)
                    + torch.nn.functional.binary_cross_entropy_with_logits(out["seg"], masks))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():  # batch-norm statistics of the final weights (the running ones lag behind)
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
                    module.momentum = None
            model(images)
    model.eval()
    saved = config_to_dict(cfg)
    saved["model"]["name"] = model_name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"config": saved, "model": model.state_dict(), "ema": None, "model_name": model_name}, path)
    return path


@pytest.fixture(scope="module")
def app_checkpoint(tmp_path_factory) -> Path:
    return save_test_checkpoint(tmp_path_factory.mktemp("runs") / "demo" / "latest" / "best.pth", steps=30)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, Path]:
    return demo.ensure_examples(tmp_path_factory.mktemp("examples"))


def test_examples_are_one_brisc_named_slice_per_class_made_once(examples, tmp_path):
    assert list(examples) == ["glioma", "meningioma", "no_tumor", "pituitary"]
    assert [p.name for p in examples.values()] == [f"brisc2025_test_0000{i}_{c}_ax_t1.jpg"
                                                   for i, c in enumerate(("gl", "me", "no", "pi"), 1)]
    assert cv2.imread(str(examples["glioma"]), cv2.IMREAD_UNCHANGED).shape == demo.EXAMPLE_SIZE
    stamps = {p: p.stat().st_mtime_ns for p in examples.values()}
    assert demo.ensure_examples(examples["glioma"].parent) == examples  # reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in examples.values()} == stamps


def test_page_prediction_equals_test_py_input_on_the_same_file(app_checkpoint, examples, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("glioma", "pituitary"):
        (folder / examples[name].name).write_bytes(examples[name].read_bytes())
    out = tmp_path / "out"
    assert run_main(_load_entry("test").main, ["--checkpoint", str(app_checkpoint), "--input", str(folder),
                                                "--out", str(out), "--device", "cpu", "--tta",
                                                "--threshold", "0.3", "--runtime", "torch"]) == 0
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}

    model, cfg, _ = load_model_from_checkpoint(app_checkpoint, "cpu")
    classes = set()
    for path in sorted(folder.iterdir()):
        grey = demo.read_upload(path.read_bytes(), path.name)  # the page's route: the upload's bytes
        page = predict_image(model, cfg, grey, threshold=0.3, tta=True)
        row = rows[path.name]
        assert page.predicted_class == row["predicted_class"]
        assert page.probabilities == pytest.approx([float(row[f"p_{n}"]) for n in demo.CLASS_NAMES], abs=1e-6)
        written = cv2.imread(str(out / "masks" / f"{path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(page.mask(), written)
        assert int(row["tumour_pixels"]) == int((written > 0).sum())
        assert 0 < (written > 0).mean() < 1  # a mask with both values, so the comparison means something
        classes.add(page.predicted_class)
    assert len(classes) == 2  # the model's class depends on the image


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def test_uploads_of_every_supported_kind_decode_to_the_slice(examples):
    # checked against the known pixels, not against datasets.decode (which read_upload itself calls)
    grey = cv2.imread(str(examples["glioma"]), cv2.IMREAD_GRAYSCALE)[:300, :200]
    sixteen = (grey.astype(np.uint16) * 257)
    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    assert np.array_equal(demo.read_upload(_png(grey), "grey.png"), grey)
    assert np.array_equal(demo.read_upload(_png(colour), "colour.png"), grey)  # three equal channels: the grey
    jpeg = demo.read_upload(cv2.imencode(".jpg", colour)[1].tobytes(), "slice.jpg")
    assert jpeg.shape == (300, 200) and np.abs(jpeg.astype(int) - grey).mean() < 3  # lossy, but the same slice
    wide = demo.read_upload(_png(sixteen), "sixteen.png")  # 16-bit: one channel of 8 bits, order kept
    assert wide.dtype == np.uint8 and wide.shape == (300, 200)
    assert np.corrcoef(wide.ravel(), grey.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("case, message", [
    ("empty", "'x' is empty"),
    ("text", "'x' is not an image"),
    ("truncated", "'x' is a damaged or truncated image"),
    ("huge", "'x' is 8000x5001 pixels (40.0 megapixels); the limit is 40 megapixels"),
    ("tiny", "'x' is 20x20 pixels; images smaller than 32 px"),
])
def test_uploads_that_cannot_be_predicted_get_a_message(examples, case, message):
    jpeg = examples["glioma"].read_bytes()
    data = {"empty": b"", "text": b"patient notes, not a slice\n", "truncated": jpeg[: len(jpeg) // 2],
            "huge": _png(np.zeros((5001, 8000), np.uint8)), "tiny": _png(np.zeros((20, 20), np.uint8))}[case]
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        demo.read_upload(data, "x")


def test_the_size_limit_is_checked_before_decoding(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image above the size limit")

    big = io.BytesIO()
    Image.new("L", (100, 100)).save(big, "PNG")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(demo, "decode_grey_buffer", no_decoding)
    with pytest.raises(DataError, match="the limit is 0.005 megapixels"):
        demo.read_upload(big.getvalue(), "x", max_pixels=5000)


def test_checkpoints_offered_newest_first_and_a_clear_exit_without_any(tmp_path, capsys):
    app = _load_entry("app")
    runs = tmp_path / "runs"
    assert run_main(app.main, ["--runs", str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoint found") and demo.DEMO_COMMAND in err and "\n" not in err
    old = save_test_checkpoint(runs / "old" / "latest" / "best.pth")
    new = save_test_checkpoint(runs / "new" / "latest" / "best.pth")
    os.utime(old, (1, 1))
    assert demo.find_checkpoints(runs) == [new, old]
    assert app.offered_checkpoints(app.parse_args(["--runs", str(runs)])) == [new, old]
    chosen = app.offered_checkpoints(app.parse_args(["--runs", str(runs), "--checkpoint", str(old)]))
    assert chosen == [old, new]
    assert run_main(app.main, ["--runs", str(runs), "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth' does not exist" in capsys.readouterr().err


def test_area_share_overlay_and_record_match_hand_counts(app_checkpoint, examples):
    grey = np.zeros((40, 50), np.uint8)
    grey[5:35, 10:40] = 100  # head: 30 x 30 = 900 pixels above the threshold
    grey[5:35, 40:41] = demo.HEAD_THRESHOLD  # not above it
    mask = np.zeros_like(grey)
    mask[10:20, 10:19] = 255  # 90 tumour pixels, all inside the head
    assert demo.tumour_area(mask, grey) == {"tumour_pixels": 90, "head_pixels": 900, "tumour_share_of_head": 0.1}
    assert demo.tumour_area(mask, np.zeros_like(grey))["tumour_share_of_head"] is None

    blended = demo.overlay(grey, mask, 0.5)
    assert blended.shape == (40, 50, 3) and blended.dtype == np.uint8
    assert tuple(blended[12, 12]) == tuple(round(0.5 * 100 + 0.5 * c) for c in demo.MASK_COLOUR)
    assert tuple(blended[30, 30]) == (100, 100, 100)
    assert np.array_equal(demo.overlay(grey, mask, 0.0), np.repeat(grey[..., None], 3, 2))
    assert demo.for_display(blended, 25).shape == (20, 25, 3) and demo.for_display(blended, 50) is blended

    model, cfg, _ = load_model_from_checkpoint(app_checkpoint, "cpu")
    slice_grey = demo.read_upload(examples["meningioma"].read_bytes(), "m.jpg")
    prediction = predict_image(model, cfg, slice_grey)
    # two thresholds inside this model's own probability range, so the two masks differ whatever it learnt
    low, high = (float(q) for q in np.quantile(prediction.tumour_probability, [0.98, 0.995]))
    assert low < high
    record = json.loads(demo.record_json(demo.prediction_record(prediction, slice_grey, high, False, "m.jpg",
                                                                app_checkpoint, cfg.model.name)))
    at_07 = prediction.mask(high)
    assert record["tumour_pixels"] == int((at_07 > 0).sum()) != int((prediction.mask(low) > 0).sum())
    assert record["predicted_class"] == prediction.predicted_class and record["threshold"] == pytest.approx(high)
    assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert np.array_equal(cv2.imdecode(np.frombuffer(demo.mask_png(at_07), np.uint8), cv2.IMREAD_GRAYSCALE), at_07)


def test_gradcam_view_is_at_the_slice_size_and_follows_the_chosen_class(app_checkpoint, examples):
    model, cfg, _ = load_model_from_checkpoint(app_checkpoint, "cpu")
    grey = demo.read_upload(examples["glioma"].read_bytes(), "g.jpg")[:, :400]  # non-square: 512 x 400
    prediction = predict_image(model, cfg, grey)
    views = [demo.gradcam_view(model, cfg, prediction, grey, c) for c in range(4)]
    assert all(v.shape == (512, 400, 3) and v.dtype == np.uint8 for v in views)
    assert np.array_equal(demo.gradcam_view(model, cfg, prediction, grey), views[prediction.class_index])
    assert len({v.tobytes() for v in views}) > 1


# ------------------------------------------------------------------------------------ the page, without a browser
def _page(checkpoint: str, runs: str, examples_dir: str, extra: tuple = ()) -> None:
    """The page script as Streamlit's AppTest runs it (a function's body becomes the script)."""
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("app_page", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    app.render_page(app.parse_args(["--checkpoint", checkpoint, "--runs", runs, "--examples-dir", examples_dir,
                                    *extra]))


def test_page_explains_an_unknown_architecture_and_serves_the_other_checkpoint(app_checkpoint, examples, tmp_path,
                                                                             monkeypatch):
    from streamlit.testing.v1 import AppTest

    # AppTest installs its script as sys.modules["__main__"] and leaves it there, which would make every later
    # multiprocessing "spawn" child (the distributed tests) run the page script: put the real one back after.
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])

    unknown = save_test_checkpoint(tmp_path / "other" / "best.pth", model_name="not_a_model")
    runs = app_checkpoint.parents[2]
    page = AppTest.from_function(_page, args=(str(unknown), str(runs), str(examples["glioma"].parent)),
                                 default_timeout=60)
    page.run()
    assert any("not a medical device" in w.value for w in page.warning)
    assert [e.value for e in page.error] == [
        f"cannot use this checkpoint: checkpoint '{unknown}' holds a model this version cannot build: model.name "
        "'not_a_model' is not a registered model (python -c \"from model import list_models; print(list_models())\")"]
    picker = page.sidebar.selectbox[0]
    assert [str(p) for p in picker.options] == [str(unknown), str(app_checkpoint)]

    picker.select(picker.options[1]).run()  # the server kept serving: pick the other run
    assert not page.error
    page.button(key="example_glioma").click().run()
    model, cfg, _ = load_model_from_checkpoint(app_checkpoint, "cpu")
    expected = predict_image(model, cfg, examples["glioma"])
    texts = [m.value for m in page.markdown]
    assert f"### Predicted class: {expected.predicted_class}" in texts
    pixels = f"Tumour area: **{int((expected.mask(0.5) > 0).sum())} pixels**"
    assert any(t.startswith(pixels) for t in texts)
    page.sidebar.slider[0].set_value(0.3).run()  # the threshold slider re-thresholds the same prediction
    lower = f"Tumour area: **{int((expected.mask(0.3) > 0).sum())} pixels**"
    assert lower != pixels and any(m.value.startswith(lower) for m in page.markdown)


def test_page_on_onnxruntime_predicts_what_the_eager_model_does_and_says_so(app_checkpoint, examples, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from datasets.naming import CLASS_NAMES

    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # as above
    page = AppTest.from_function(_page, args=(str(app_checkpoint), str(app_checkpoint.parents[2]),
                                              str(examples["glioma"].parent), ("--runtime", "onnxruntime")),
                                 default_timeout=120)
    page.run()
    assert not page.error
    assert any("runtime onnxruntime fp32 (max |difference| from PyTorch" in c.value for c in page.sidebar.caption)
    page.button(key="example_glioma").click().run()
    model, cfg, _ = load_model_from_checkpoint(app_checkpoint, "cpu")
    expected = predict_image(model, cfg, examples["glioma"])
    texts = [m.value for m in page.markdown]
    assert f"### Predicted class: {expected.predicted_class}" in texts
    assert " · ".join(f"{n}: {p:.3f}" for n, p in zip(CLASS_NAMES, expected.probabilities)) in texts
    assert (app_checkpoint.parent / "exports").is_dir()  # exported on first use into the run directory
