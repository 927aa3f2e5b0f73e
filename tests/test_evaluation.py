"""Publishable test figures: subsets, native-resolution scoring, bootstrap intervals, calibration, breakdowns,
output-folder and table conventions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.cli import run_main
from utils.errors import UserError
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from datasets.index import Sample
from evaluation.bootstrap import bootstrap_intervals, resample_counts, resampled_figures
from evaluation.breakdowns import breakdowns
from evaluation.calibration import expected_calibration_error, fit_temperature, nll, softmax
from evaluation.conventions import check_comparable, output_folder_name, setting_label, setting_of
from evaluation.metrics import MultiTaskMetrics
from evaluation.native import NativeCounts
from evaluation import pipeline
from evaluation.subsets import PerImage, excluded_list, per_image_overlap, subset_figures, subset_indices
from evaluation.summary import format_value, summary_table
from tests.helpers import SHARED_BRISC
from utils.config import ConfigError

CLASSES = ["glioma", "meningioma", "no_tumor", "pituitary"]


def random_table(n: int, seed: int = 0, accuracy: float = 0.8) -> PerImage:
    """N images with random labels, logits right about `accuracy` of the time and random pixel counts."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    preds = np.where(rng.random(n) < accuracy, labels, rng.integers(0, 4, n))
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), preds] += 6
    def counts() -> np.ndarray:
        tp = np.where(labels == 2, 0, rng.integers(0, 400, n))
        fp, fn = rng.integers(0, 100, n), np.where(labels == 2, 0, rng.integers(1, 100, n))
        return np.stack([tp, fp, fn, 4096 - tp - fp - fn], 1)
    return PerImage(stems=[f"img{i:04d}" for i in range(n)], labels=labels, logits=logits,
                    planes=list(rng.choice(["ax", "co", "sa"], n)), annotated=rng.random(n) < 0.95,
                    native=counts(), train_res=counts())


# ------------------------------------------------------------------------------------------ subsets
def test_all_subset_equals_the_accumulated_metrics():
    """Figures from per-image records must equal MultiTaskMetrics' device-side counts on the same batch."""
    torch.manual_seed(0)
    n, size = 12, 16
    masks = (torch.rand(n, 1, size, size) > 0.7).float()
    masks[:3] = 0
    outputs = {"cls": torch.randn(n, 4), "seg": torch.randn(n, 1, size, size) * 2}
    batch = {"label": torch.randint(0, 4, (n,)), "mask": masks, "has_mask": torch.tensor([True] * 11 + [False]),
             "id": [f"s{i}" for i in range(n)]}
    metrics = MultiTaskMetrics(4, CLASSES, keep_per_image=True)
    metrics.update(outputs, batch)
    records = metrics.per_image_records()
    counts = np.array([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in records])
    table = PerImage([r["id"] for r in records], batch["label"].numpy(), outputs["cls"].numpy(), ["ax"] * n,
                     batch["has_mask"].numpy(), counts, counts)
    expected = metrics.compute()
    figures = subset_figures(table, np.arange(n), CLASSES)
    for key, value in expected.items():
        assert figures[key] == (value if key == "confusion_matrix" else pytest.approx(value)), key
        if key.startswith(("dice", "iou")):
            assert figures[f"{key}_train_res"] == pytest.approx(value), key


def test_leak_free_subset_excludes_exactly_the_planted_leaks():
    table = random_table(30)
    planted = {table.stems[3]: ["brisc2025_train_00010_gl_ax_t1"], table.stems[17]: ["a", "b"],
               "not_in_this_split": ["c"]}
    index = subset_indices(table.stems, planted)
    assert set(index["leaked"]) == {3, 17}
    assert set(index["leak_free"]) == set(range(30)) - {3, 17} and len(index["all"]) == 30
    leak_free = subset_figures(table, index["leak_free"], CLASSES)
    kept = index["leak_free"]
    assert leak_free["num_images"] == 28
    assert leak_free["accuracy"] == pytest.approx(accuracy_score(table.labels[kept], table.preds[kept]))
    excluded = excluded_list(planted, table.stems, "the train split")
    assert [e["stem"] for e in excluded] == sorted([table.stems[3], table.stems[17]])
    assert excluded[1]["matches"] == ["a", "b"] and "2 image(s) of the train split" in excluded[1]["reason"]
    assert list(subset_indices(table.stems, None)) == ["all"]  # no leak check: no leak-free subset claimed


# ------------------------------------------------------------------------------------------ native resolution
def test_native_dice_of_a_hand_made_non_square_image(tmp_path: Path):
    """A 30x50 image; the model-size (8x8) logits are +10 in columns 0-3 and -10 in 4-7. Bilinear upsampling
    (align_corners=False) puts the zero crossing at source column 3.5, i.e. output x = 4 * 50 / 8 - 0.5 = 24.5:
    the left 25 columns are predicted. The mask (grey 250 with ringing values 5 and 120, which binarise to 0)
    covers rows 5-14 x columns 20-34: TP = 10 x 5 = 50, FP = 30 x 25 - 50 = 700, FN = 150 - 50 = 100,
    Dice = 100 / 900, IoU = 50 / 850."""
    height, width = 30, 50
    mask = np.full((height, width), 5, np.uint8)
    mask[5:15, 20:35] = 250
    mask[0, 0] = 120
    cv2.imwrite(str(tmp_path / "case.png"), mask)
    cv2.imwrite(str(tmp_path / "case.jpg"), np.full((height, width), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "empty.jpg"), np.full((21, 36), 90, np.uint8))
    samples = [Sample("case", 0, "ax", tmp_path / "case.jpg", tmp_path / "case.png"),
               Sample("empty", 2, "co", tmp_path / "empty.jpg", None)]
    logits = torch.full((2, 1, 8, 8), -10.0)
    logits[:, :, :, :4] = 10.0
    native = NativeCounts(samples, [0.5])
    native.update(logits, ["case", "empty"])
    counts, annotated = native.counts(["case", "empty"])
    assert annotated.tolist() == [True, True]
    assert counts[0, 0].tolist() == [50, 700, 100, height * width - 850]
    assert counts[1, 0].tolist() == [0, 21 * 18, 0, 21 * 18]  # crossing at x = 4 * 36 / 8 - 0.5  # no-tumour image: empty mask at its own size
    table = PerImage(["case", "empty"], np.array([0, 2]), np.eye(4)[[0, 2]], ["ax", "co"], annotated,
                     counts[:, 0], counts[:, 0])
    figures = subset_figures(table, np.arange(2), CLASSES)
    assert figures["dice"] == pytest.approx(100 / 900) and figures["iou"] == pytest.approx(50 / 850)
    assert figures["empty_fp_rate"] == 1.0


def test_native_counts_undo_the_letterbox(tmp_path: Path):
    """The same 30x50 case letterboxed into 10x10: the image occupies rows 2-7 (scale 0.2). Inside that box the
    logits are +10 in columns 0-4, so the crossing lands at x = 5 * 50 / 10 - 0.5 = 24.5 again: the same
    counts as stretched. The padding rows hold +10 too; counting them would change every figure."""
    mask = np.zeros((30, 50), np.uint8)
    mask[5:15, 20:35] = 255
    cv2.imwrite(str(tmp_path / "case.png"), mask)
    cv2.imwrite(str(tmp_path / "case.jpg"), mask)
    logits = torch.full((1, 1, 10, 10), -10.0)
    logits[:, :, :, :5] = 10.0
    logits[:, :, [0, 1, 8, 9], :] = 10.0
    native = NativeCounts([Sample("case", 0, "ax", tmp_path / "case.jpg", tmp_path / "case.png")], [0.5],
                          resize_mode="letterbox")
    native.update(logits, ["case"])
    assert native.counts(["case"])[0][0, 0].tolist() == [50, 700, 100, 1500 - 850]


def test_threshold_tuning_picks_the_best_native_dice():
    # (N images, 2 candidates, TP FP FN TN): A is perfect at 0.3, B at 0.7; C has no tumour (not averaged).
    counts = np.array([[[10, 0, 0, 90], [5, 0, 5, 90]], [[8, 2, 0, 90], [8, 0, 0, 92]], [[0, 3, 0, 97], [0, 0, 0, 100]]])
    best, scores = pipeline.tune_threshold(counts, np.array([True, True, True]), [0.3, 0.7])
    assert scores[0.3] == pytest.approx((1 + 16 / 18) / 2) and scores[0.7] == pytest.approx((10 / 15 + 1) / 2)
    assert best == 0.3


# ------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_intervals_contain_the_estimate_and_are_seeded():
    table = random_table(400, seed=1)
    index = np.arange(400)
    point = subset_figures(table, index, CLASSES)
    first = bootstrap_intervals(table, index, 4, resamples=500, seed=7)
    for key in ("accuracy", "f1_macro", "dice", "iou"):
        low, high = first[key]
        assert low <= point[key] <= high and high - low < 0.2, key
    assert bootstrap_intervals(table, index, 4, resamples=500, seed=7) == first
    assert bootstrap_intervals(table, index, 4, resamples=500, seed=8)["dice"] != first["dice"]  # accuracy: exact, seed-free
    assert bootstrap_intervals(table, np.array([], dtype=int), 4)["accuracy"] is None


def test_each_resample_matches_scikit_learn_and_a_direct_computation():
    table = random_table(200, seed=2, accuracy=0.6)
    index = np.arange(10, 200)  # a subset, as for leak-free figures
    counts = resample_counts(len(index), 50, seed=3)
    assert (counts.sum(1) == len(index)).all()
    figures = resampled_figures(table, index, counts, 4)
    rng = np.random.default_rng(3)
    draws = rng.integers(0, len(index), size=(50, len(index)))  # the same draws resample_counts made
    for b in (0, 17, 49):
        chosen = index[draws[b]]
        y_true, y_pred = table.labels[chosen], table.preds[chosen]
        assert figures["accuracy"][b] == pytest.approx(accuracy_score(y_true, y_pred))
        assert figures["f1_macro"][b] == pytest.approx(
            f1_score(y_true, y_pred, average="macro", zero_division=0))  # classes present, as sklearn
        direct = subset_figures(table, chosen, CLASSES)  # the resample as a dataset with repeated images
        assert figures["dice"][b] == pytest.approx(direct["dice"])
        assert figures["iou"][b] == pytest.approx(direct["iou"])


def test_per_class_resamples_match_scikit_learn_and_the_class_dice():
    table = random_table(300, seed=5, accuracy=0.7)
    index = np.arange(300)
    counts = resample_counts(len(index), 20, seed=6)
    figures = resampled_figures(table, index, counts, 4, CLASSES)
    draws = np.random.default_rng(6).integers(0, len(index), size=(20, len(index)))
    for b in (0, 11, 19):
        chosen = index[draws[b]]
        y_true, y_pred = table.labels[chosen], table.preds[chosen]
        precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
        direct = subset_figures(table, chosen, CLASSES)  # dice_<class>: mean over that class's tumour images
        for c, name in enumerate(CLASSES):
            assert figures[f"recall_{name}"][b] == pytest.approx(recall[c])
            assert figures[f"precision_{name}"][b] == pytest.approx(precision[c])
            assert figures[f"f1_{name}"][b] == pytest.approx(f1[c])
            if f"dice_{name}" in direct:
                assert figures[f"dice_{name}"][b] == pytest.approx(direct[f"dice_{name}"])
    intervals = bootstrap_intervals(table, index, 4, resamples=300, seed=0, class_names=CLASSES)
    point = subset_figures(table, index, CLASSES)
    for name in CLASSES:
        low, high = intervals[f"recall_{name}"]
        assert low <= point[f"recall_{name}"] <= high
    assert "recall_glioma" not in bootstrap_intervals(table, index, 4, resamples=50, seed=0)  # names opt in


def test_class_dice_is_the_mean_over_each_class_tumour_images():
    table = random_table(120, seed=8)
    figures = subset_figures(table, np.arange(120), CLASSES)
    dice, _ = per_image_overlap(table.native)
    tumour = table.annotated & ((table.native[:, 0] + table.native[:, 2]) > 0)
    for c, name in enumerate(CLASSES):
        mine = tumour & (table.labels == c)
        assert (f"dice_{name}" in figures) == bool(mine.any())
        if mine.any():
            assert figures[f"dice_{name}"] == pytest.approx(dice[mine].mean())


def test_singleton_groups_are_the_per_image_bootstrap():
    # the timing-only test that stood here could not fail on a wrong interval; this one can
    table = random_table(300, seed=4)
    plain = bootstrap_intervals(table, np.arange(300), 4, resamples=400, seed=0)
    grouped = bootstrap_intervals(table, np.arange(300), 4, resamples=400, seed=0, groups=np.arange(300) * 7)
    for key in ("dice", "iou", "f1_macro", "accuracy"):
        assert grouped[key] == pytest.approx(plain[key])
    assert plain["num_groups"] == 300 and plain["methods"]["accuracy"] == "clopper-pearson"


# ------------------------------------------------------------------------------------------ calibration
def test_ece_of_a_perfectly_calibrated_case_is_zero_and_of_an_overconfident_one_its_gap():
    probs, labels = [], []
    for confidence in (0.4, 0.55, 0.7, 0.85, 1.0):
        for i in range(100):
            rest = (1 - confidence) / 3
            probs.append([confidence, rest, rest, rest])
            labels.append(0 if i < round(100 * confidence) else 1)
    assert expected_calibration_error(np.array(probs), np.array(labels)) == pytest.approx(0.0, abs=1e-12)
    overconfident = np.tile([0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3], (10, 1))
    assert expected_calibration_error(overconfident, np.array([0] * 6 + [1] * 4)) == pytest.approx(0.3)


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (2000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    overconfident = 4.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert 3.0 < temperature < 5.0
    assert nll(overconfident, labels, temperature) < nll(overconfident, labels) - 0.1
    assert (softmax(overconfident, temperature).argmax(1) == overconfident.argmax(1)).all()


# ------------------------------------------------------------------------------------------ breakdowns
def test_breakdowns_per_plane_class_and_size_tercile():
    table = random_table(300, seed=5)
    index = np.arange(300)
    out = breakdowns(table, index, CLASSES, ["ax", "co", "sa"])
    assert sum(v["num_images"] for v in out["plane"].values()) == 300
    assert sum(v["num_images"] for v in out["class"].values()) == 300
    ax = index[np.array(table.planes) == "ax"]
    assert out["plane"]["ax"]["accuracy"] == pytest.approx(accuracy_score(table.labels[ax], table.preds[ax]))
    assert out["class"]["glioma"]["accuracy"] == pytest.approx(subset_figures(table, index, CLASSES)["recall_glioma"])
    sizes = out["tumour_size"]
    tumour_images = subset_figures(table, index, CLASSES)["num_tumour_images"]
    assert list(sizes) == ["small", "medium", "large"]
    assert sum(v["num_images"] for v in sizes.values()) == tumour_images
    assert sizes["small"]["area_fraction"][1] <= sizes["large"]["area_fraction"][0]


# ------------------------------------------------------------------------------------------ conventions
def test_output_folder_names_never_collide_and_default_stays_put():
    assert output_folder_name("test") == "test_test" and output_folder_name("val") == "test_val"
    assert output_folder_name("test", tta=True) == "test_test_tta"
    assert output_folder_name("test", threshold=0.45, tuned=True) == "test_test_thr0.45-tuned"
    assert output_folder_name("val", checkpoint="last", raw_weights=True, subset="all") == "test_val_last_raw_all"
    names = {output_folder_name(split, subset, tta, thr, 0.5, tuned, cal)
             for split in ("test", "val") for subset in ("leak_free", "all") for tta in (False, True)
             for thr, tuned in ((0.5, False), (0.45, False), (0.45, True)) for cal in (False, True)}
    assert len(names) == 2 * 2 * 2 * 3 * 2


def test_tuning_or_calibrating_on_the_scored_split_is_refused():
    for flags in ({"tune_threshold": True}, {"calibrate": True}):
        with pytest.raises(ConfigError, match="--split val"):
            pipeline.check_options(pipeline.TestOptions(checkpoint=Path("x.pth"), split="val", **flags))
        pipeline.check_options(pipeline.TestOptions(checkpoint=Path("x.pth"), split="test", **flags))
    with pytest.raises(ConfigError, match="--subset"):
        pipeline.check_options(pipeline.TestOptions(checkpoint=Path("x.pth"), subset="leaked"))


def test_settings_of_old_and_new_metrics_files_and_mixing_refused():
    old = {"split": "val", "threshold": 0.5, "tta": False, "accuracy": 0.99}
    assert setting_of(old) == {"split": "val", "subset": "all", "resolution": "train", "threshold": 0.5,
                               "threshold_tuned": False, "tta": False, "calibrated": False, "gate_masks": False}
    new = {"split": "test", "headline_subset": "leak_free", "resolution": "native", "threshold": 0.45,
           "threshold_tuned": True, "tta": True, "temperature": 1.3}
    assert setting_label(setting_of(new)) == ("test, leak-free, native res., thr 0.45 tuned on val, flip TTA, "
                                              "temperature-scaled")
    check_comparable([setting_of(new), dict(setting_of(new), tta=False)], ["a", "b"])  # marked, not refused
    with pytest.raises(ValueError, match="subset"):
        check_comparable([setting_of(new), dict(setting_of(new), subset="all")], ["a", "b"])
    with pytest.raises(ValueError, match="resolution"):
        check_comparable([setting_of(dict(old, split="test", headline_subset="leak_free")), setting_of(new)],
                         ["a", "b"])


def test_summary_table_shows_subsets_side_by_side_with_intervals():
    subsets = {"all": {"accuracy": 0.993, "num_images": 1000, "ci95": {"accuracy": [0.988, 0.997]}},
               "leak_free": {"accuracy": 0.9922, "num_images": 899, "ci95": {"accuracy": [0.986, 0.997]}},
               "leaked": {"num_images": 0}}
    table = summary_table(subsets, "leak_free")
    assert "| all " in table and "leak-free *" in table and "leaked" in table
    assert "99.30 [98.80, 99.70]" in table and "99.22 [98.60, 99.70]" in table
    assert format_value("dice", {"dice": float("nan")}) == "–" and format_value("num_images", {"num_images": 3}) == "3"
    per_class = summary_table({"all": {"recall_glioma": 0.9, "recall_macro": 0.8, "f1_glioma": 0.85,
                                       "dice_glioma": 0.6, "num_images": 10,
                                       "ci95": {"dice_glioma": [0.5, 0.7]}}}, "all")
    assert "Recall glioma" in per_class and "Dice glioma (per image)" in per_class and "60.00 [50.00, 70.00]" in \
        per_class and "Recall macro " not in per_class
    assert per_class.index("Dice glioma") < per_class.index("| Images ")  # per-class rows before the counts


def test_results_rows_name_their_setting_and_refuse_mixed_conventions(tmp_path: Path, capsys):
    from evaluation import readme_table as results

    for name, metrics in (("a", {"split": "test", "headline_subset": "leak_free", "resolution": "native"}),
                          ("b", {"split": "test", "headline_subset": "all", "resolution": "native"})):
        (tmp_path / name / "test_test").mkdir(parents=True)
        (tmp_path / name / "test_test" / "metrics.json").write_text(json.dumps({"model": "x", **metrics}))
        (tmp_path / name / "config.yaml").write_text("model:\n  name: light_unet\n")
    code = run_main(results.main, [str(tmp_path / "a"), str(tmp_path / "b"), "--split", "test"])
    assert code == 2 and "differ in subset" in capsys.readouterr().err
    setting = setting_of({"split": "test", "headline_subset": "all", "threshold": 0.4, "threshold_tuned": True,
                          "tta": True})
    assert results.test_command("runs/r", setting) == ("python test.py --checkpoint runs/r/best.pth --split test "
                                                       "--subset all --tta --tune-threshold")


def test_benchmark_metrics_name_their_setting_and_refuse_mixed_conventions(tmp_path: Path):
    import benchmark

    base = {"split": "test", "headline_subset": "leak_free", "resolution": "native", "threshold": 0.5,
            "accuracy": 0.9, "dice": 0.8}
    (tmp_path / "a.json").write_text(json.dumps({**base, "model": "unet", "tta": True}))
    (tmp_path / "b.json").write_text(json.dumps({**base, "model": "vit"}))
    found = benchmark.load_metrics([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert found["unet"]["test_setting"].endswith("flip TTA") and found["vit"]["test_setting"].endswith("no TTA")
    (tmp_path / "b.json").write_text(json.dumps({**base, "model": "vit", "split": "val"}))
    with pytest.raises(UserError, match="differ in split"):
        benchmark.load_metrics([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert math.isfinite(found["unet"]["accuracy"])


def test_leak_check_is_skipped_with_a_reason_where_no_training_data_exists(tmp_path: Path):
    from evaluation.leaks import leak_check

    (tmp_path / "classification_task" / "test").mkdir(parents=True)
    leaked, info = leak_check(tmp_path, "test", tmp_path / "split.json", [])
    assert leaked is None and info["applied"] is False and "no train split" in info["reason"]
    leaked, info = leak_check(tmp_path, "train", tmp_path / "split.json", [])
    assert leaked is None and "training data itself" in info["reason"]


@pytest.mark.skipif(not SHARED_BRISC.is_dir(), reason="real BRISC 2025 data not present")
def test_a_model_perfect_at_128_px_scores_about_0_96_native_dice_on_real_masks():
    """Masks reduced to 128 px as the loader does, used as logits and scored against the original files:
    the resolution ceiling (0.964 measured on the whole release; 0.964 on the 30 masks of the sample)."""
    from datasets.decode import load_sample
    from datasets.index import index_split

    samples = [s for s in index_split(SHARED_BRISC, "test") if s.mask is not None]
    native = NativeCounts(samples, [0.5])
    for sample in samples:
        _, mask = load_sample(sample, 128)
        native.update(torch.from_numpy(mask.astype(np.float32) / 255 * 8 - 4)[None, None], [sample.stem])
    stems = [s.stem for s in samples]
    counts, annotated = native.counts(stems)
    table = PerImage(stems, np.zeros(len(stems), int), np.zeros((len(stems), 4)), ["ax"] * len(stems), annotated,
                     counts[:, 0], counts[:, 0])
    assert 0.95 < subset_figures(table, np.arange(len(stems)), CLASSES)["dice"] < 0.98
