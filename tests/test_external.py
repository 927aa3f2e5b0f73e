"""Scoring a BRISC-trained checkpoint on another dataset's layout (evaluation/sources.py, test.py --data-format)
and the cross-dataset duplicate check (datasets/cross_dataset_copies.py, python -m datasets.check ROOT --against OTHER)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from datasets.duplicates import read_manifest
from datasets.synthetic_layouts import generate_layout
from evaluation.bootstrap import bootstrap_intervals
from evaluation.labels import label_figures, label_intervals, label_space, parse_class_map
from evaluation.subsets import PerImage
from evaluation import pipeline
from utils.cli import run_main
from tests.helpers import coarse_imagefolder, save_untrained_checkpoint
from utils.config import ConfigError

COARSE = "glioma=tumour,meningioma=tumour,pituitary=tumour,no_tumor=normal"
COARSE_MAP = parse_class_map(COARSE)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_brisc, tmp_path_factory) -> Path:
    """An untrained, seeded model saved as a run checkpoint of `tiny_brisc` (its predictions vary per image)."""
    return save_untrained_checkpoint(tiny_brisc, tmp_path_factory.mktemp("run"))


def _train_image(root: Path, class_name: str, n: int) -> Path:
    return sorted((root / "classification_task" / "train" / class_name).glob("*.jpg"))[n]


@pytest.fixture(scope="module")
def folders(tiny_brisc, tmp_path_factory) -> Path:
    """An imagefolder test split `Testing/{tumour,normal}` of images from another generated dataset, plus an exact
    copy (same pixels, another name) and a near copy (rescaled) of two of tiny_brisc's training images."""
    root = coarse_imagefolder(tmp_path_factory.mktemp("external"))
    shutil.copyfile(_train_image(tiny_brisc, "glioma", 0), root / "Testing" / "tumour" / "planted_exact.jpg")
    grey = cv2.imread(str(_train_image(tiny_brisc, "meningioma", 0)), cv2.IMREAD_GRAYSCALE)
    near = cv2.resize(grey, (grey.shape[1] * 9 // 10, grey.shape[0] * 9 // 10), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "Testing" / "tumour" / "planted_near.png"), near)
    return root


# --------------------------------------------------------------------------------------------- labels and figures
def test_class_map_from_text_or_yaml(tmp_path):
    assert parse_class_map(" yes = tumour , no=normal ") == {"yes": "tumour", "no": "normal"}
    (tmp_path / "map.yaml").write_text("'yes': tumour\nno_tumor: normal\n")
    assert parse_class_map(str(tmp_path / "map.yaml")) == {"yes": "tumour", "no_tumor": "normal"}
    (tmp_path / "bool.yaml").write_text("yes: tumour\n")
    with pytest.raises(ConfigError, match="quote names such as 'yes'"):
        parse_class_map(str(tmp_path / "bool.yaml"))
    (tmp_path / "cfg.yaml").write_text("data:\n  layout:\n    class_map:\n      notumor: normal\n")
    assert parse_class_map(str(tmp_path / "cfg.yaml")) == {"notumor": "normal"}
    with pytest.raises(ConfigError, match="NAME=LABEL"):
        parse_class_map("glioma")
    with pytest.raises(ConfigError, match="missing.yaml' does not exist"):
        parse_class_map(str(tmp_path / "missing.yaml"))


def test_label_space_maps_folder_and_model_names():
    own = label_space({"tumor": "glioma"})
    assert own.is_model_space and own.resolve("notumor") == "no_tumor" and own.resolve("tumor") == "glioma"
    coarse = label_space(COARSE_MAP)
    assert not coarse.is_model_space
    assert coarse.names == ["tumour", "normal"] and coarse.of_model_class == [0, 0, 1, 0] and coarse.negative == 1
    assert coarse.resolve("notumor") == "normal"  # the folder alias first, then the map
    assert coarse.label_of_folder(Path("x/normal")) == 1
    with pytest.raises(ConfigError, match=r"class folder 'x/weird' maps to 'weird'.*--class-map 'weird="):
        coarse.label_of_folder(Path("x/weird"))


def test_two_label_figures_match_scikit_learn():
    space = label_space(COARSE_MAP)  # tumour 0 (positive), normal 1
    truth = np.array([0, 0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 0])
    p_tumour = np.array([0.9, 0.8, 0.6, 0.3, 0.2, 0.4, 0.7])
    figures = label_figures(truth, pred, np.stack([p_tumour, 1 - p_tumour], 1), space)
    assert figures["detection_sensitivity"] == pytest.approx(3 / 4)  # hand-counted
    assert figures["detection_specificity"] == pytest.approx(2 / 3)
    assert figures["detection_sensitivity"] == pytest.approx(recall_score(truth == 0, pred == 0))
    assert figures["detection_specificity"] == pytest.approx(recall_score(truth == 1, pred == 1))
    assert figures["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert figures["f1_macro"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert figures["detection_auc"] == pytest.approx(roc_auc_score(truth == 0, p_tumour))
    assert figures["detection_auc"] == pytest.approx(9 / 12)  # 9 of the 12 (tumour, normal) pairs ranked right
    assert figures["out_of_set_rate"] == 0.0

    separate = label_space({"no_tumor": "normal"})  # glioma, meningioma, normal, pituitary: kept apart
    truth, pred = np.array([0, 0, 2, 2]), np.array([0, 1, 2, 3])  # a glioma-vs-normal set
    figures = label_figures(truth, pred, None, separate)
    assert figures["out_of_set_rate"] == 0.5 and figures["num_out_of_set"] == 2
    assert "detection_sensitivity" not in figures  # four labels: no detection figures
    mixed = label_space({"glioma": "a", "no_tumor": "a", "meningioma": "b", "pituitary": "b"})
    assert len(mixed.names) == 2 and not mixed.detects_tumour  # no_tumor shares its label: not tumour detection


def test_label_intervals_agree_with_the_test_py_bootstrap():
    rng = np.random.default_rng(4)
    truth, logits = rng.integers(0, 4, 60), rng.normal(size=(60, 4))
    none = np.zeros((60, 4), dtype=np.int64)
    table = PerImage(stems=[str(i) for i in range(60)], labels=truth, logits=logits, planes=[""] * 60,
                     annotated=np.zeros(60, bool), native=none, train_res=none, has_seg=False)
    index = np.arange(60)
    reference = bootstrap_intervals(table, index, 4, resamples=200, seed=3)
    ours = label_intervals(truth, logits.argmax(1), label_space({}), resamples=200, seed=3)
    assert ours["accuracy"] == pytest.approx(reference["accuracy"]) and ours["f1_macro"] == pytest.approx(
        reference["f1_macro"])
    low, high = ours["balanced_accuracy"]
    assert low <= balanced_accuracy_score(truth, logits.argmax(1)) <= high


# --------------------------------------------------------------------------------------------- test.py runs
def test_coarse_imagefolder_run_excludes_planted_copies(checkpoint, folders, capsys):
    results = pipeline.run_test(pipeline.TestOptions(checkpoint=checkpoint, data_root=str(folders),
                                                 data_format="imagefolder", class_map=COARSE_MAP, num_workers=0,
                                                 bootstrap=20, show_progress=False))
    out = checkpoint.parent / "test_ext_folders_test"
    assert (out / "metrics.json").is_file() and not (checkpoint.parent / "test_test").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_space"]["labels"] == ["tumour", "normal"]
    assert "segmentation" in metrics["absent_figures"]
    assert not any(key.startswith(("dice", "iou", "hd95")) for key in metrics["subsets"]["all"])

    leak = metrics["leak_check"]
    assert leak["applied"] and leak["num_leaked"] == 2 and (leak["num_exact"], leak["num_near"]) == (1, 1)
    kinds = {e["stem"]: e["kind"] for e in leak["excluded"]}
    assert kinds == {"planted_exact": "exact", "planted_near": "near"}
    assert all(e["matches"][0].startswith("train/") for e in leak["excluded"])
    total = metrics["subsets"]["all"]["num_images"]
    assert metrics["subsets"]["leak_free"]["num_images"] == total - 2 and metrics["num_images"] == total - 2

    with open(out / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["stem"]: r["subset"] for r in rows}["planted_near"] == "leaked"
    free = [r for r in rows if r["subset"] == "leak_free"]
    truth = np.array([r["true_label"] == "tumour" for r in free])
    pred = np.array([r["pred_label"] == "tumour" for r in free])
    assert metrics["detection_sensitivity"] == pytest.approx(recall_score(truth, pred))
    assert metrics["detection_specificity"] == pytest.approx(recall_score(~truth, ~pred))
    assert metrics["detection_auc"] == pytest.approx(roc_auc_score(truth, [float(r["prob_tumour"]) for r in free]))
    assert results["accuracy"] == pytest.approx(float(np.mean(truth == pred)))
    printed = capsys.readouterr().out
    assert "1 identical, 1 near-identical" in printed and "Tumour detection sensitivity" in printed


def test_pairs_run_has_no_class_figures_and_boundaries_in_mm(checkpoint, tmp_path):
    root = generate_layout(tmp_path / "pairs", "pairs", 4, 8, seed=19, verbose=False)
    common = dict(checkpoint=checkpoint, data_root=str(root), data_format="pairs", data_opts=["data.layout.mask_suffix=_mask"],
                  num_workers=0, bootstrap=0, show_progress=False)
    pixels = pipeline.run_test(pipeline.TestOptions(out_dir=tmp_path / "px", **common))
    mm = pipeline.run_test(pipeline.TestOptions(out_dir=tmp_path / "mm", spacing=[2.0, 2.0], **common))
    assert "classification" in pixels["absent_figures"]
    assert not {"accuracy", "f1_macro", "confusion_matrix", "balanced_accuracy"} & set(pixels["subsets"]["all"])
    assert pixels["dice"] is not None and pixels["num_images"] == 2  # 20 % of 12 pairs
    assert (pixels["distance_unit"], mm["distance_unit"]) == ("px", "mm")
    assert mm["hd95"] == pytest.approx(2 * pixels["hd95"]) and mm["assd"] == pytest.approx(2 * pixels["assd"])


def test_an_unmappable_folder_is_a_clear_error(checkpoint, tmp_path, capsys):
    import test as test_entry

    root = tmp_path / "odd"
    for folder in ("weird", "notumor"):
        (root / "Testing" / folder).mkdir(parents=True)
        cv2.imwrite(str(root / "Testing" / folder / "a.png"), np.full((40, 40), 90, np.uint8))
    code = run_main(test_entry.main, ["--checkpoint", str(checkpoint), "--data-root", str(root), "--data-format",
                                      "imagefolder", "--no-progress", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "class folder" in err and "weird" in err and "--class-map" in err
    assert not (checkpoint.parent / "test_ext_odd_test").exists()
    assert run_main(test_entry.main, ["--checkpoint", str(checkpoint), "--class-map", "yes=tumour"]) == 2
    assert "--class-map applies to another dataset: give --data-format" in capsys.readouterr().err
    code = run_main(test_entry.main, ["--checkpoint", str(checkpoint), "--data-root", str(root), "--data-format",
                                      "imagefolder", "--opts", "data.preprocess.image_size=32"])
    assert code == 2 and "layout keys only" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- datasets.check --against
def test_cross_root_check_finds_the_planted_copies(tiny_brisc, folders, tmp_path, capsys):
    from datasets.check import main

    manifest = tmp_path / "cross.json"
    assert main([str(folders), "--format", "imagefolder", "--class-map", "tumour=glioma", "normal=no_tumor",
                 "--against", str(tiny_brisc), "--manifest", str(manifest), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    groups, data = read_manifest(manifest)
    assert sorted(g.kind for g in groups) == ["exact", "near"]
    members = {stem for g in groups for stem in g.stems}
    assert {"planted_exact", "planted_near"} <= members and len(members) == 4  # each copy with its original
    assert all({split.split(":")[0] for split in g.splits} == {"root", "against"} for g in groups)
    assert data["per_class"]["root"]["glioma"]["exact"] == 1 and data["per_class"]["root"]["glioma"]["near"] == 1
    assert data["per_class"]["root"]["no_tumor"]["exact"] == data["per_class"]["root"]["no_tumor"]["near"] == 0
    against = data["per_class"]["against"]
    assert (against["glioma"]["exact"], against["meningioma"]["near"]) == (1, 1)
    assert sum(c["exact"] + c["near"] for c in against.values()) == 2
    assert "1 of" in printed and "1 more a near-identical one" in printed


def test_own_classes_on_an_imagefolder_set_score_as_test_py(checkpoint, tmp_path):
    root = generate_layout(tmp_path / "kaggle", "imagefolder", 4, 8, seed=23, verbose=False)  # Kaggle folder names
    results = pipeline.run_test(pipeline.TestOptions(checkpoint=checkpoint, data_root=str(root), data_format="imagefolder",
                                                 out_dir=tmp_path / "out", num_workers=0, bootstrap=0,
                                                 show_progress=False, subset="all"))
    assert results["label_space"]["scoring"] == "model classes" and results["num_images"] == 8
    assert len(results["confusion_matrix"]) == 4 and results["calibration"] is not None
    assert not any(key.startswith("dice") for key in results) and "detection_sensitivity" not in results
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv", newline="")))
    assert results["accuracy"] == pytest.approx(np.mean([r["true_label"] == r["pred_label"] for r in rows]))
    assert {r["true_label"] for r in rows} <= {"glioma", "meningioma", "no_tumor", "pituitary"}


def test_the_training_root_itself_is_all_overlap(checkpoint, tiny_brisc, tmp_path):
    """The same files count as copies across datasets (within one dataset a file is never its own leak)."""
    results = pipeline.run_test(pipeline.TestOptions(checkpoint=checkpoint, data_root=str(tiny_brisc), data_format="brisc",
                                                 out_dir=tmp_path / "self", num_workers=0, bootstrap=0,
                                                 show_progress=False))
    leak = results["leak_check"]
    assert leak["num_leaked"] == leak["num_exact"] == results["num_images"] == 16
    assert results["headline_subset"] == "all" and "no leak-free figures" in leak["note"]
    assert results["accuracy"] is not None and results["dice"] is not None  # brisc: both tasks


def test_in_domain_boundaries_in_mm_with_a_spacing(checkpoint, tmp_path):
    common = dict(checkpoint=checkpoint, num_workers=0, bootstrap=0, show_progress=False, subset="all")
    pixels = pipeline.run_test(pipeline.TestOptions(out_dir=tmp_path / "px", **common))
    mm = pipeline.run_test(pipeline.TestOptions(out_dir=tmp_path / "mm", spacing=[0.5, 0.5], **common))
    assert (pixels["distance_unit"], mm["distance_unit"]) == ("px", "mm")
    assert mm["hd95"] == pytest.approx(0.5 * pixels["hd95"]) and mm["dice"] == pixels["dice"]


def test_layout_settings_take_the_layout_section_and_older_flat_keys():
    from evaluation.sources import layout_settings
    from utils.config import Config

    data = Config().data
    data.layout.spacing = [0.5, 0.5]  # the run's own spacing is not the other dataset's
    assert layout_settings(data, ["data.layout.test_dir=."]).test_dir == "."
    older = layout_settings(data, ["data.test_dir=.", "data.mask_suffix=_m"])
    assert (older.test_dir, older.mask_suffix, older.spacing) == (".", "_m", None)
    with pytest.raises(ConfigError, match=r"--layout data.preprocess.image_size=64: .*data.layout.test_dir"):
        layout_settings(data, ["data.preprocess.image_size=64"])
