"""Image inputs a user may bring: 16-bit PNGs with 12-bit data, tiny images, unreadable files among good ones,
folders of unknown classes; and folder prediction at each image's own size."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datasets.brisc_integrity import check_dataset
from datasets.decode import MIN_IMAGE_SIDE, DataError, ImageTooSmallError, decode_grey, read_grey
from datasets.geometry import logits_to_original
from datasets.index import index_split
from datasets.transforms import load_image_for_inference
from prediction import folder as folder_module
from prediction.folder import predict_folder
from model import build_model
from model.loading import model_kwargs
from utils.checkpoint import atomic_save
from utils.config import config_from_dict, config_to_dict


def _brain_slice(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """An 8-bit grey test image using the whole 0..255 range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = 200 * np.exp(-(((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 3)) ** 2))
    image[height // 3: height // 2, width // 3: width // 2] = 255
    image += rng.normal(0, 6, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    image[0, 0] = 0
    return image


def _twelve_bit_copy(image8: np.ndarray) -> np.ndarray:
    """The same slice as an MRI export writes it: 12-bit values (0..4095) in a 16-bit PNG."""
    return np.rint(image8.astype(np.float64) * 4095 / 255).astype(np.uint16)


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    """A checkpoint of an untrained, small EfficientMTNet (decoding and geometry do not need a trained one)."""
    torch.manual_seed(0)
    cfg = config_from_dict({"data": {"preprocess": {"image_size": 64}}})
    model = build_model(cfg.model.name, **model_kwargs(cfg)).eval()
    path = tmp_path / "run" / "best.pth"
    path.parent.mkdir()
    atomic_save({"config": config_to_dict(cfg), "model": model.state_dict(), "ema": None,
                 "model_name": cfg.model.name}, path)
    return path


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


# --------------------------------------------------------------------------------------------- decoding
def test_twelve_bit_png_decodes_like_its_eight_bit_copy(tmp_path):
    image8 = _brain_slice()
    cv2.imwrite(str(tmp_path / "eight.png"), image8)
    cv2.imwrite(str(tmp_path / "twelve.png"), _twelve_bit_copy(image8))
    assert cv2.imread(str(tmp_path / "twelve.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    decoded8, depth8 = decode_grey(tmp_path / "eight.png")
    decoded12, depth12 = decode_grey(tmp_path / "twelve.png")
    assert (depth8, depth12) == (8, 16) and decoded12.dtype == np.uint8
    # 8-bit decoding used to keep the top byte of the 16-bit values: 0..15 instead of 0..255.
    assert np.abs(decoded12.astype(int) - decoded8.astype(int)).max() <= 1


def test_sixteen_bit_files_of_one_scanner_share_one_scale(tmp_path):
    """Scaled by the bit depth in use (4095 for 12-bit data), not by each file's own min..max: two crops of one
    12-bit slice, one without its brightest part, keep the same grey levels (the old per-file stretch did not)."""
    from datasets.decode import depth_scale

    rng = np.random.default_rng(0)
    slice12 = rng.integers(200, 2500, (64, 96)).astype(np.uint16)
    slice12[:, 64:] = 3900  # a bright region only the wide crop holds
    cv2.imwrite(str(tmp_path / "wide.png"), slice12)
    cv2.imwrite(str(tmp_path / "narrow.png"), slice12[:, :64])
    wide, narrow = decode_grey(tmp_path / "wide.png")[0], decode_grey(tmp_path / "narrow.png")[0]
    expected = np.rint(slice12.astype(np.float64) * 255 / 4095).astype(np.uint8)  # hand-computed
    assert np.array_equal(wide, expected) and np.array_equal(narrow, expected[:, :64])
    assert depth_scale(slice12) == 4095 and depth_scale(slice12[:, :64]) == 4095  # max 2499 -> 12 bits
    assert depth_scale(np.array([[200]], np.uint16)) == 255  # 8-bit data in a 16-bit file stays as it is
    assert depth_scale(np.array([[0.0, 0.7]], np.float32)) == 1.0 and depth_scale(np.array([[4096]], np.uint16)) == 8191


def test_images_below_the_minimum_size_are_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "tiny.png"), np.full((1, 1), 128, np.uint8))
    cv2.imwrite(str(tmp_path / "thin.png"), np.full((MIN_IMAGE_SIDE - 1, 200), 128, np.uint8))
    cv2.imwrite(str(tmp_path / "ok.png"), np.full((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), 128, np.uint8))
    for name, size in (("tiny.png", "1x1"), ("thin.png", f"200x{MIN_IMAGE_SIDE - 1}")):
        with pytest.raises(ImageTooSmallError, match=f"'.*{name}' is {size} pixels; images smaller than 32 px"):
            read_grey(tmp_path / name)
    assert read_grey(tmp_path / "ok.png").shape == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)


# --------------------------------------------------------------------------------------------- folder prediction
def test_folder_prediction_predicts_every_readable_image_and_lists_the_rest(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    image8 = _brain_slice()
    cv2.imwrite(str(folder / "a_eight.png"), image8)
    cv2.imwrite(str(folder / "b_twelve.png"), _twelve_bit_copy(image8))
    (folder / "c_empty.png").write_bytes(b"")
    cv2.imwrite(str(folder / "d_tiny.png"), np.full((1, 1), 200, np.uint8))
    cv2.imwrite(str(folder / "e_other.jpg"), _brain_slice(120, 90, seed=1))
    out = tmp_path / "out"

    failed = predict_folder(checkpoint, folder, out, "cpu", threshold=0.5)
    assert failed == ["c_empty.png", "d_tiny.png"]
    console = capsys.readouterr().out
    assert "failed: c_empty.png: cannot decode image" in console and "failed: d_tiny.png:" in console
    rows = _rows(out)
    assert list(rows) == ["a_eight.png", "b_twelve.png", "c_empty.png", "d_tiny.png", "e_other.jpg"]
    assert rows["c_empty.png"]["status"] == "failed" and "empty, truncated" in rows["c_empty.png"]["error"]
    assert rows["d_tiny.png"]["status"] == "failed" and "1x1 pixels" in rows["d_tiny.png"]["error"]
    assert {rows[n]["status"] for n in ("a_eight.png", "b_twelve.png", "e_other.jpg")} == {"ok"}
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_eight_mask.png", "b_twelve_mask.png",
                                                                 "e_other_mask.png"]
    assert cv2.imread(str(out / "masks" / "e_other_mask.png"), cv2.IMREAD_GRAYSCALE).shape == (120, 90)

    # The 12-bit PNG gets the prediction of its 8-bit copy (within the rounding of the decoded pixels).
    eight, twelve = rows["a_eight.png"], rows["b_twelve.png"]
    assert eight["predicted_class"] == twelve["predicted_class"]
    for key in (k for k in eight if k.startswith("p_")):
        assert float(eight[key]) == pytest.approx(float(twelve[key]), abs=0.01)
    mask8 = cv2.imread(str(out / "masks" / "a_eight_mask.png"), cv2.IMREAD_GRAYSCALE)
    mask12 = cv2.imread(str(out / "masks" / "b_twelve_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert np.mean(mask8 != mask12) < 0.005
    # ... because the model is given the same input (an untrained model's output depends little on it).
    data_cfg = config_from_dict({"data": {"preprocess": {"image_size": 64}}}).data
    x8, size8 = load_image_for_inference(folder / "a_eight.png", data_cfg)
    x12, size12 = load_image_for_inference(folder / "b_twelve.png", data_cfg)
    assert size8 == size12 == (80, 96)
    assert (x8 - x12).abs().max() <= 1.01 / 255 / min(data_cfg.preprocess.std)  # one grey level


def test_test_py_input_exits_1_when_a_file_failed(checkpoint, tmp_path):
    import importlib.util

    from tests.helpers import REPO
    from utils.cli import run_main

    spec = importlib.util.spec_from_file_location("test_entry", REPO / "test.py")
    test_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_entry)
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), _brain_slice())
    args = ["--checkpoint", str(checkpoint.parent), "--input", str(folder), "--device", "cpu", "--out"]
    assert run_main(test_entry.main, [*args, str(tmp_path / "one")]) == 0  # a run folder: its best.pth
    (folder / "bad.png").write_text("not an image")
    assert run_main(test_entry.main, [*args, str(tmp_path / "two")]) == 1


def test_masks_come_from_upsampled_logits(checkpoint, tmp_path, monkeypatch):
    """The mask at the image's own size is the threshold of bilinearly upsampled logits, not a nearest-neighbour
    enlargement of the thresholded model-size mask."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    logits = (12.0 - ((yy - 30.3) ** 2 + (xx - 33.7) ** 2).sqrt()).view(1, 1, 64, 64)  # a disc of radius 12

    def fake_predict(model, images, tta=False):
        return {"cls": torch.zeros(1, 4), "seg": logits}

    monkeypatch.setattr(folder_module, "predict", fake_predict)
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "slice.png"), _brain_slice(150, 100))
    predict_folder(checkpoint, folder, tmp_path / "out", "cpu", threshold=0.5, runtime="torch")
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "slice_mask.png"), cv2.IMREAD_GRAYSCALE)
    expected = (torch.sigmoid(logits_to_original(logits, (150, 100)))[0, 0] >= 0.5).numpy()
    assert mask.shape == (150, 100) and np.array_equal(mask > 0, expected)


def test_no_mix_with_an_earlier_run(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(folder_module, "predict", lambda model, images, tta=False: {  # the model plays no part here
        "cls": torch.zeros(len(images), 4), "seg": torch.zeros(len(images), 1, 64, 64)})  # (a batch per call)
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, names in ((first, ["x.png", "y.png"]), (second, ["z.png"])):
        folder.mkdir()
        for i, name in enumerate(names):
            cv2.imwrite(str(folder / name), _brain_slice(seed=i))
    out = tmp_path / "out"
    predict_folder(checkpoint, first, out, "cpu")
    predict_folder(checkpoint, second, out, "cpu")
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["z_mask.png"]
    assert "removed 2 mask(s) of an earlier run" in capsys.readouterr().out
    # Without --out every run writes a folder of its own under the run directory.
    predict_folder(checkpoint, first, None, "cpu")
    predict_folder(checkpoint, first, None, "cpu")
    runs = sorted((checkpoint.parent / "predictions").iterdir())
    assert len(runs) == 2 and all(len(list((r / "masks").iterdir())) == 2 for r in runs)


# --------------------------------------------------------------------------------------------- dataset checks
@pytest.fixture()
def data_copy(tiny_brisc, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_brisc, tmp_path / "copy", symlinks=True))


def test_unknown_class_folder_is_reported_and_refused(data_copy):
    extra = data_copy / "classification_task" / "train" / "astrocytoma"
    extra.mkdir()
    source = next((data_copy / "classification_task" / "train" / "glioma").glob("*.jpg"))
    shutil.copyfile(source, extra / "brisc2025_train_09999_gl_ax_t1.jpg")
    report = check_dataset(data_copy)
    assert not report.ok and "result: OK" not in report.render()
    assert any("astrocytoma" in d for d in report.errors["folder of an unknown class (training refuses it)"])
    with pytest.raises(DataError, match=r"'.*astrocytoma' is not one of the configured classes \(glioma, "):
        index_split(data_copy, "train")


def test_check_reports_sixteen_bit_and_tiny_images(data_copy):
    folder = data_copy / "classification_task" / "train" / "no_tumor"
    files = sorted(folder.glob("*.jpg"))
    deep = files[0].with_suffix(".png")
    cv2.imwrite(str(deep), _twelve_bit_copy(read_grey(files[0])))
    files[0].unlink()
    cv2.imwrite(str(files[1]), np.full((8, 8), 90, np.uint8))
    report = check_dataset(data_copy)
    assert report.warnings["16-bit image (scaled to 8 bits by its bit depth in use)"] == [str(deep)]
    assert any(files[1].name in d for d in report.errors[f"image below {MIN_IMAGE_SIDE} px"])


def test_the_evaluation_transform_is_built_once_per_settings_and_thread():
    """Prediction calls it per image; building the albumentations pipeline each time cost as much as running it."""
    import threading

    from datasets.transforms import inference_transform

    prep = config_from_dict({"data": {"preprocess": {"image_size": 64}}}).data.preprocess
    first = inference_transform(prep)
    assert inference_transform(prep) is first
    other = config_from_dict({"data": {"preprocess": {"image_size": 32}}}).data.preprocess
    assert inference_transform(other) is not first
    elsewhere = []
    worker = threading.Thread(target=lambda: elsewhere.append(inference_transform(prep)))
    worker.start()
    worker.join()
    assert elsewhere[0] is not first  # a thread of its own gets its own pipeline
    grey = np.full((64, 64), 100, np.uint8)
    empty = np.zeros((64, 64), np.uint8)
    assert torch.equal(first(grey, empty)[0], elsewhere[0](grey, empty)[0])
