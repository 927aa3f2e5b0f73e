"""A head-geometry run (data.preprocess.resize: head) end to end: test.py's pipeline, `--input` prediction, the web demo's
Grad-CAM and record, and the shift benchmark, on generated data with non-square images and one image whose
head cannot be found (letterboxed instead). A stretch run on the same data keeps its old way back."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import prediction.folder as folder_module
from datasets.decode import read_grey, to_square
from datasets.factory import build_eval_dataset
from datasets.geometry import logits_to_original, place
from datasets.index import index_split
from datasets.mri_shifts import imitated_by
from datasets.naming import CLASS_NAMES, format_name
from datasets.splits import save_split
from datasets.synthetic import generate, render
from evaluation.inference import predict
from evaluation.native import NativeCounts
from evaluation.pipeline import TestOptions as Options, run_test
from model.loading import load_model_from_checkpoint
from prediction import demo
from prediction.folder import predict_folder, predict_image
from tests.helpers import save_untrained_checkpoint

MARGIN = 0.1


def _add_image(root: Path, split: str, stem: str, label: int, image: np.ndarray, mask: np.ndarray) -> Path:
    """One image (and its mask, for a tumour class) in the BRISC layout, as the generator writes them."""
    path = root / "classification_task" / split / CLASS_NAMES[label] / f"{stem}.png"
    cv2.imwrite(str(path), image)
    if label != 3:
        cv2.imwrite(str(root / "segmentation_task" / split / "images" / f"{stem}.png"), image)
        cv2.imwrite(str(root / "segmentation_task" / split / "masks" / f"{stem}.png"), mask.astype(np.uint8) * 255)
    return path


def _no_head(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark canvas with a small bright block (under the 2 % a head needs) and its mask on that block."""
    image = np.zeros((height, width), np.uint8)
    image[40:46, 60:66] = 220
    mask = np.zeros_like(image, bool)
    mask[41:45, 61:65] = True
    return image, mask


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Generated data plus non-square tumour slices and one image without a findable head in each split."""
    root = generate(tmp_path_factory.mktemp("head") / "brisc", 16, 8, seed=11, verbose=False)
    rng = np.random.default_rng(4)
    added = {}
    for split in ("train", "test"):
        for index, (label, plane, size) in enumerate([(1, "ax", (300, 200)), (0, "co", (200, 320))], start=100):
            image, mask = render(rng, label, plane, size)
            stem = format_name(split, index, label, plane)
            added[stem] = _add_image(root, split, stem, label, image, mask)
        stem = format_name(split, 102, 1, "sa")
        added[stem] = _add_image(root, split, stem, 1, *_no_head(180, 260))
    train = [s.stem for s in index_split(root, "train")]
    val = [s for s in train if s.endswith(("_00100_me_ax_t1", "_00102_me_sa_t1"))] + train[:4]
    return {"root": root, "added": added, "split": {"train": [s for s in train if s not in val], "val": val},
            "fallback": {split: format_name(split, 102, 1, "sa") for split in ("train", "test")}}


def _run(data: dict, folder: Path, resize: str) -> Path:
    folder.mkdir()
    save_split(data["split"], folder / "split.json")
    return save_untrained_checkpoint(data["root"], folder, [f"data.preprocess.resize={resize}", f"data.preprocess.head_margin={MARGIN}"])


@pytest.fixture(scope="module")
def head_run(data, tmp_path_factory) -> Path:
    return _run(data, tmp_path_factory.mktemp("runs") / "head", "head")


@pytest.fixture(scope="module")
def stretch_run(data, tmp_path_factory) -> Path:
    return _run(data, tmp_path_factory.mktemp("runs") / "stretch", "stretch")


def _per_image(out: Path) -> dict[str, dict]:
    with open(out / "per_image.csv", newline="", encoding="utf-8") as handle:
        return {row["stem"]: row for row in csv.DictReader(handle)}


def _expected_areas(checkpoint: Path, threshold: float, way_back) -> dict[str, tuple[int, int, tuple]]:
    """stem -> (predicted pixels, true pixels, (height, width)) at each image's own size, recomputed from the
    model's logits on the whole test split (one batch, as scored) and `way_back(grey) -> Placement | mode`."""
    model, cfg, _ = load_model_from_checkpoint(checkpoint, "cpu")
    dataset = build_eval_dataset(cfg.data, "test", verbose=False)
    with torch.no_grad():
        logits = predict(model, torch.stack([dataset[i]["image"] for i in range(len(dataset))]))["seg"].float()
    cut = float(np.log(threshold / (1 - threshold)))
    out = {}
    for i, sample in enumerate(dataset.samples):
        grey = read_grey(sample.image)
        # no-tumour images are scored against an empty mask of their size
        truth = np.zeros(grey.shape, bool) if sample.mask is None else read_grey(sample.mask) >= sample.mask_threshold
        back = logits_to_original(logits[i:i + 1], grey.shape, way_back(grey))[0, 0].numpy() >= cut
        out[sample.stem] = (int(back.sum()), int(truth.sum()), back.shape)
    return out


def test_head_run_scores_each_image_at_its_own_size_and_reports_the_fallback(data, head_run, tmp_path, capsys):
    metrics = run_test(Options(checkpoint=head_run, split="test", out_dir=tmp_path / "test", num_workers=0,
                                   show_progress=False, bootstrap=0, tune_threshold=True))
    printed = capsys.readouterr().out
    test_stem, val_stem = data["fallback"]["test"], data["fallback"]["train"]
    assert metrics["geometry"] == {"resize": "head", "head_margin": MARGIN, "head_fallbacks": 1,
                                   "fallback_stems": [test_stem]}
    assert metrics["threshold_tuning"]["val_head_fallbacks"] == 1  # the validation pass placed its images too
    assert f"head not found in 1 of 11 images of the test split ({test_stem})" in printed
    assert "head not found in 1 of 6 images of the validation split" in printed and val_stem in printed
    on_disk = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert on_disk["geometry"]["fallback_stems"] == [test_stem]

    rows = _per_image(tmp_path / "test")
    expected = _expected_areas(head_run, metrics["threshold"], lambda grey: place(grey, 64, "head", MARGIN))
    assert len(expected) == len(rows) == 11 and all(row["true_area"] != "" for row in rows.values())
    for stem, (pred_area, true_area, (height, width)) in expected.items():
        row = rows[stem]
        assert (int(row["height"]), int(row["width"])) == (height, width), stem  # the file's own size
        assert (int(row["pred_area"]), int(row["true_area"])) == (pred_area, true_area), stem
    assert {(int(rows[s]["height"]), int(rows[s]["width"])) for s in data["added"] if "_test_" in s} == {
        (300, 200), (200, 320), (180, 260)}
    # the figures vary per image, and the way back differs from a stretch of the same logits somewhere
    assert len({int(row["pred_area"]) for row in rows.values() if row["pred_area"]}) > 2
    stretched = _expected_areas(head_run, metrics["threshold"], lambda grey: "stretch")
    assert any(stretched[s][0] != expected[s][0] for s in expected)


def test_head_run_on_another_dataset_reports_its_fallbacks(data, head_run, tmp_path, capsys):
    metrics = run_test(Options(checkpoint=head_run, split="test", data_root=str(data["root"]), data_format="brisc",
                                   out_dir=tmp_path / "ext", num_workers=0, show_progress=False, bootstrap=0))
    assert metrics["geometry"]["head_fallbacks"] == 1 and metrics["num_tumour_images"] >= 1
    assert "head not found in 1 of 11 images" in capsys.readouterr().out


def test_native_counts_need_a_placement_in_head_mode(data):
    samples = index_split(data["root"], "test")
    with pytest.raises(ValueError, match="placement"):
        NativeCounts(samples, [0.5], "head")


def _planted_logits(grey: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """Model-size logits that say "tumour" exactly where the image's placed mask is: +10 / -10."""
    placed = to_square(mask.astype(np.uint8) * 255, 64, place(grey, 64, "head", MARGIN), is_mask=True)
    return torch.from_numpy(np.where(placed > 0, 10.0, -10.0).astype(np.float32))[None, None]


@pytest.mark.parametrize("which", ["non_square", "fallback"])
def test_predict_image_mask_equals_the_geometry_round_trip(data, head_run, monkeypatch, which):
    stem = format_name("test", 100, 1, "ax") if which == "non_square" else data["fallback"]["test"]
    path = data["added"][stem]
    grey = read_grey(path)
    mask = read_grey(path.parents[3] / "segmentation_task" / "test" / "masks" / f"{stem}.png") > 0
    logits = _planted_logits(grey, mask)
    monkeypatch.setattr(folder_module, "predict", lambda model, images, tta=False: {
        "cls": torch.zeros(1, 4), "seg": logits})
    model, cfg, _ = load_model_from_checkpoint(head_run, "cpu")
    result = predict_image(model, cfg, path, threshold=0.5)
    placement = place(grey, 64, "head", MARGIN)
    assert result.placement == placement and placement.fallback == (which == "fallback")
    assert result.placement_label == ("letterbox (no head found)" if which == "fallback" else "head")
    round_trip = logits_to_original(logits, grey.shape, placement)[0, 0].numpy() > 0
    assert result.mask().shape == grey.shape and np.array_equal(result.mask() > 0, round_trip)
    # mask -> input -> mask loses only the resampling at the model's 64 px
    dice = 2 * (round_trip & mask).sum() / (round_trip.sum() + mask.sum())
    assert dice > 0.8
    # the page shows the same placement in its record and maps Grad-CAM back to the slice's own size
    record = demo.prediction_record(result, grey, 0.5, False, path.name, head_run, cfg.model.name)
    assert record["placement"]["mode"] == placement.mode and record["placement"]["head_not_found"] == placement.fallback
    if placement.box is not None:
        assert tuple(record["placement"]["head_box"].values()) == placement.box


def test_folder_prediction_and_gradcam_on_a_head_run(data, head_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for stem, path in data["added"].items():
        if "_test_" in stem:
            (folder / path.name).write_bytes(path.read_bytes())
    assert predict_folder(head_run, folder, tmp_path / "out", "cpu") == []
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    fallback = f"{data['fallback']['test']}.png"
    assert {name: row["placement"] for name, row in rows.items()} == {
        name: "letterbox (no head found)" if name == fallback else "head" for name in rows}
    assert f"head not found in 1 of 3 images ({fallback})" in capsys.readouterr().out
    for name in rows:
        written = cv2.imread(str(tmp_path / "out" / "masks" / name.replace(".png", "_mask.png")), cv2.IMREAD_GRAYSCALE)
        assert written.shape == read_grey(folder / name).shape

    model, cfg, _ = load_model_from_checkpoint(head_run, "cpu")
    upload = cv2.cvtColor(read_grey(data["added"][format_name("test", 101, 0, "co")]), cv2.COLOR_GRAY2BGR)
    grey = demo.read_upload(cv2.imencode(".png", upload)[1].tobytes(), "colour.png")  # uploads are read as grey
    assert grey.ndim == 2
    prediction = predict_image(model, cfg, grey)
    assert prediction.placement.mode == "head"
    assert demo.gradcam_view(model, cfg, prediction, grey).shape == (200, 320, 3)
    with pytest.raises(folder_module.DataError, match="greyscale"):
        predict_image(model, cfg, upload)


def test_stretch_run_keeps_its_way_back(data, stretch_run, tmp_path, capsys):
    metrics = run_test(Options(checkpoint=stretch_run, split="test", out_dir=tmp_path / "test", num_workers=0,
                                   show_progress=False, bootstrap=0))
    assert metrics["geometry"] == {"resize": "stretch"} and "head not found" not in capsys.readouterr().out
    rows = _per_image(tmp_path / "test")
    expected = _expected_areas(stretch_run, metrics["threshold"], lambda grey: "stretch")  # the mode's name
    for stem, (pred_area, true_area, (height, width)) in expected.items():
        assert (int(rows[stem]["pred_area"]), int(rows[stem]["height"]), int(rows[stem]["width"])) == (
            pred_area, height, width), stem
    model, cfg, _ = load_model_from_checkpoint(stretch_run, "cpu")
    path = data["added"][format_name("test", 101, 0, "co")]
    result = predict_image(model, cfg, path)
    with torch.no_grad():
        logits = predict(model, result.model_input[None])["seg"]
    old = (torch.sigmoid(logits_to_original(logits, (200, 320), "stretch"))[0, 0].numpy() >= 0.5)
    assert result.placement.mode == "stretch" and np.array_equal(result.mask() > 0, old)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    predict_folder(stretch_run, folder, tmp_path / "out", "cpu", runtime="torch")
    header = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[0]
    assert "placement" not in header


def test_shift_benchmark_on_a_head_run(data, head_run, tmp_path, capsys):
    from evaluation.shift import main

    reference = run_test(Options(checkpoint=head_run, split="test", out_dir=tmp_path / "test", num_workers=0,
                                     show_progress=False, bootstrap=0))
    assert main(["--checkpoint", str(head_run), "--split", "test", "--shifts", "ghosting", "noise",
                 "--severities", "1", "2", "--out", str(tmp_path / "shift"), "--no-progress", "--num-workers",
                 "0"]) == 0
    result = json.loads((tmp_path / "shift" / "shift.json").read_text())
    every = reference["subsets"]["all"]
    assert result["clean"]["accuracy"] == pytest.approx(every["accuracy"], abs=1e-12)
    assert result["clean"]["dice"] == pytest.approx(every["dice_train_res"], abs=1e-12)
    assert result["geometry"] == reference["geometry"] and result["geometry"]["head_fallbacks"] == 1
    _, cfg, _ = load_model_from_checkpoint(head_run, "cpu")
    assert result["imitated_by"] == {"ghosting": [], "noise": imitated_by("noise", cfg.data.augment)}
    assert result["held_out"] == ["ghosting"]
    ghosting = result["shifted"]["ghosting"]
    assert result["held_out_mean"]["dice"] == pytest.approx((ghosting["1"]["dice"] + ghosting["2"]["dice"]) / 2)
    table = capsys.readouterr().out
    noise_by = ", ".join(result["imitated_by"]["noise"]) or "held out"
    assert any(line.startswith("| ghosting") and "| held out" in line for line in table.splitlines())
    assert any(line.startswith("| noise") and f"| {noise_by}" in line for line in table.splitlines())
    assert "mean over held-out shifts" in table and "head not found in 1 of 11 images" in table


def test_comparison_figure_redraws_a_head_run_in_the_reference_frame(data, head_run, stretch_run, tmp_path):
    from visualization.cases import compare_checkpoints, masks_in_frame

    _, head_cfg, _ = load_model_from_checkpoint(head_run, "cpu")
    _, stretch_cfg, _ = load_model_from_checkpoint(stretch_run, "cpu")
    head = build_eval_dataset(head_cfg.data, "test", verbose=False)
    stretch = build_eval_dataset(stretch_cfg.data, "test", verbose=False)
    stems = [format_name("test", 100, 1, "ax"), format_name("test", 101, 0, "co")]
    placed = np.stack([head[head.stems.index(s)]["mask"][0].numpy() > 0.5 for s in stems])
    wanted = np.stack([stretch[stretch.stems.index(s)]["mask"][0].numpy() > 0.5 for s in stems])
    redrawn = masks_in_frame(placed, stems, head, stretch)
    naive = masks_in_frame(placed, stems, head, head)  # what a plain resize of the head-frame mask would show

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    for n in range(len(stems)):
        assert dice(redrawn[n], wanted[n]) > 0.8 > dice(naive[n], wanted[n]), stems[n]
    out = compare_checkpoints([stretch_run, head_run], tmp_path / "compare.png", num=4, labels=["stretch", "head"])
    assert out.stat().st_size > 1000
