"""Other dataset layouts (`data.format: imagefolder | pairs`): generated copies load with the right counts and
labels, each broken copy gives its named error, the integrity check, and a 1-epoch train + test.py per demo config."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.check import main as check_main
from datasets.decode import load_sample
from datasets.errors import DataError
from datasets.factory import build_eval_dataset, build_train_val
from datasets.imagefolder import index_imagefolder
from datasets.synthetic_layouts import KAGGLE_FOLDERS, generate_layout
from datasets.naming import CLASS_NAMES
from datasets.pairs import UNLABELLED, index_pairs
from tests.helpers import REPO, run_entry
from utils.cli import run_main
from utils.config import ConfigError, config_from_dict

IF_CFG = {"data": {"format": "imagefolder", "preprocess": {"image_size": 32}, "loader": {"cache": "none"},
                   "split": {"val_fraction": 0.25}},
          "loss": {"seg_weight": 0, "aux_weights": []}, "train": {"monitor": "accuracy"}}
PAIRS_CFG = {"data": {"format": "pairs", "layout": {"mask_suffix": "_mask"}, "preprocess": {"image_size": 32},
                      "loader": {"cache": "none"}, "split": {"val_fraction": 0.25}}, "loss": {"cls_weight": 0}, "train": {"monitor": "dice"}}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {fmt: generate_layout(base / fmt, fmt, 24, 8, seed=3, verbose=False) for fmt in ("imagefolder", "pairs")}


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _cfg(raw: dict, root: Path):
    return config_from_dict({**raw, "data": {**raw["data"], "root": str(root)}})


# --------------------------------------------------------------------------------------------- loading
def test_generated_imagefolder_loads_with_kaggle_folder_names_mapped(layouts, tmp_path):
    root = layouts["imagefolder"]
    for split, folder in (("train", "Training"), ("test", "Testing")):
        samples = index_imagefolder(root, split)
        expected = {name: len(list((root / folder / KAGGLE_FOLDERS[name]).glob("*.jpg"))) for name in CLASS_NAMES}
        assert sum(expected.values()) == (24 if split == "train" else 8)
        assert {name: sum(s.label == i for s in samples) for i, name in enumerate(CLASS_NAMES)} == expected
        assert all(s.image.parent.name == KAGGLE_FOLDERS[CLASS_NAMES[s.label]] for s in samples)
        assert not any(s.has_mask for s in samples)  # no masks in this layout
    cfg = _cfg(IF_CFG, root)
    train, val = build_train_val(cfg.data, tmp_path / "split.json", verbose=False)
    assert len(train) + len(val) == 24 and set(train.stems).isdisjoint(val.stems)
    assert set(val.labels) == {0, 1, 2, 3}  # stratified: every class in validation
    test = build_eval_dataset(cfg.data, "test", verbose=False)
    item = test[0]
    assert len(test) == 8 and not item["has_mask"] and item["image"].shape == (3, 32, 32)


def test_generated_pairs_load_split_by_a_seeded_fraction(layouts, tmp_path):
    root = layouts["pairs"]
    train, test = (index_pairs(root, split, "_mask", test_fraction=0.25, seed=7) for split in ("train", "test"))
    assert (len(train), len(test)) == (24, 8) and not {s.stem for s in train} & {s.stem for s in test}
    assert [s.stem for s in test] == [s.stem for s in index_pairs(root, "test", "_mask", test_fraction=0.25, seed=7)]
    assert [s.stem for s in test] != [s.stem for s in index_pairs(root, "test", "_mask", test_fraction=0.25, seed=8)]
    assert all(s.label == UNLABELLED and s.has_mask and s.mask.name == f"{s.stem}_mask.png" for s in train + test)

    # <root>/{train,test}/{images,masks}: the folders give the split
    split_root = tmp_path / "split_pairs"
    for split, chosen in (("train", train[:5]), ("test", test[:3])):
        for sub in ("images", "masks"):
            (split_root / split / sub).mkdir(parents=True)
        for s in chosen:
            shutil.copy(s.image, split_root / split / "images")
            shutil.copy(s.mask, split_root / split / "masks")
    assert [len(index_pairs(split_root, split, "_mask")) for split in ("train", "test")] == [5, 3]

    cfg = _cfg(PAIRS_CFG, root)
    train_ds, val_ds = build_train_val(cfg.data, tmp_path / "split.json", verbose=False)
    item = val_ds[0]
    assert len(train_ds) + len(val_ds) == len(index_pairs(root, "train", "_mask")) and bool(item["has_mask"])
    assert item["label"] == UNLABELLED and set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_pairs_mask_threshold_comes_from_the_config(layouts, tmp_path):
    root = _copy(layouts["pairs"], tmp_path)
    sample = index_pairs(root, "train", "_mask")[0]
    height, width = cv2.imread(str(sample.image), cv2.IMREAD_GRAYSCALE).shape
    faint = np.zeros((height, width), np.uint8)
    faint[: height // 2] = 100  # a tumour drawn at grey 100
    cv2.imwrite(str(sample.mask), faint)
    for threshold, expected in ((128, 0), (64, 16 * 32)):
        sample = next(s for s in index_pairs(root, "train", "_mask", mask_threshold=threshold) if s.stem == sample.stem)
        _, mask = load_sample(sample, 32)
        assert int((mask > 0).sum()) == expected


# --------------------------------------------------------------------------------------------- errors
def test_broken_imagefolder_copies_give_named_errors(layouts, tmp_path):
    root = _copy(layouts["imagefolder"], tmp_path)
    with pytest.raises(DataError, match=r"'.*Train' does not exist.*Testing, Training.*data\.layout\.train_dir"):
        index_imagefolder(root, "train", train_dir="Train")
    (root / "Training" / "astrocytoma").mkdir()
    shutil.copy(next((root / "Training" / "notumor").glob("*.jpg")), root / "Training" / "astrocytoma" / "x.jpg")
    with pytest.raises(DataError, match=r"'.*astrocytoma' is not a known class.*data\.layout\.class_map\.astrocytoma"):
        index_imagefolder(root, "train")
    with pytest.raises(DataError, match=r"both map to class 'glioma'"):
        index_imagefolder(root, "train", extra_map={"astrocytoma": "glioma"})
    with pytest.raises(DataError, match=r"data\.layout\.class_map maps 'astrocytoma' to 'astro'"):
        index_imagefolder(root, "train", extra_map={"astrocytoma": "astro"})
    shutil.rmtree(root / "Training" / "astrocytoma")
    swapped = index_imagefolder(root, "train", extra_map={"glioma_tumor": "meningioma", "meningioma_tumor": "glioma"})
    assert all(CLASS_NAMES[s.label] == ("meningioma" if s.image.parent.name == "glioma_tumor" else "glioma")
               for s in swapped if s.image.parent.name in ("glioma_tumor", "meningioma_tumor"))  # data.layout.class_map wins
    shutil.rmtree(root / "Training" / "pituitary_tumor")
    with pytest.raises(DataError, match=r"no folder for class\(es\) pituitary"):
        index_imagefolder(root, "train")


def test_broken_pairs_copies_give_named_errors(layouts, tmp_path):
    root = _copy(layouts["pairs"], tmp_path)
    with pytest.raises(DataError, match=r"image '.*\.jpg' has no mask '.*' in .*32 unmatched.*data\.layout\.mask_suffix"):
        index_pairs(root, "train")  # without the suffix no mask matches
    mask = sorted((root / "masks").iterdir())[0]
    image = root / "images" / (mask.stem[: -len("_mask")] + ".jpg")
    image.rename(tmp_path / image.name)
    with pytest.raises(DataError, match=rf"mask '.*{mask.name}' has no image"):
        index_pairs(root, "train", "_mask")
    (tmp_path / image.name).rename(image)
    cv2.imwrite(str(mask), np.zeros((40, 50), np.uint8))  # another size than its image
    sample = next(s for s in index_pairs(root, "train", "_mask") + index_pairs(root, "test", "_mask")
                  if s.mask == mask)
    with pytest.raises(DataError, match=r"mask '.*' is 50x40 but its image .* masks must have their image's size"):
        load_sample(sample, 32)
    assert check_main([str(root), "--format", "pairs", "--mask-suffix", "_mask"]) == 1  # the integrity check
    shutil.rmtree(root / "masks")
    with pytest.raises(DataError, match=r"folder '.*masks' does not exist"):
        index_pairs(root, "train", "_mask")


def test_layout_settings_are_checked_at_config_load():
    with pytest.raises(ConfigError, match=r"loss\.seg_weight.*data\.format=imagefolder has no masks"):
        config_from_dict({"data": {"format": "imagefolder"}, "train": {"monitor": "accuracy"}})
    with pytest.raises(ConfigError, match=r"loss\.cls_weight.*data\.format=pairs has no classes"):
        config_from_dict({"data": {"format": "pairs"}})
    with pytest.raises(ConfigError, match=r"data\.format"):
        config_from_dict({"data": {"format": "coco"}})


def test_integrity_check_of_the_generated_layouts(layouts, capsys):
    assert check_main([str(layouts["imagefolder"]), "--format", "imagefolder"]) == 0
    out = capsys.readouterr().out
    assert "train: 24 images (glioma" in out and "result: OK" in out
    assert run_main(check_main, [str(layouts["pairs"]), "--format", "pairs"]) == 2  # unmatched: the loader's error
    assert "has no mask" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- end to end
TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "data.split.val_fraction=0.25", "data.loader.cache=disk",
        "data.generated.train=24", "data.generated.test=8", "eval.batch_size=16", "train.device=cpu",
        "train.threads=1", "train.epochs=1", "train.image_log_every=1"]


@pytest.mark.parametrize("config, present, absent", [
    ("configs/demo_imagefolder.yaml", "accuracy", "dice"),
    ("configs/demo_pairs.yaml", "dice", "accuracy"),
])
def test_demo_config_trains_one_epoch_and_tests(config, present, absent, tmp_path):
    name = Path(config).stem
    proc = run_entry(["train.py", "--config", config, "--no-progress", "--opts", f"data.root={tmp_path / 'data'}",
                      f"data.loader.cache_dir={tmp_path / 'cache'}", f"experiment.work_dir={tmp_path / 'runs'}", *TINY],
                     cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / name / "latest"
    proc = run_entry(["test.py", "--checkpoint", str(run_dir / "best.pth"), "--no-progress", "--bootstrap", "20",
                      "--num-workers", "0", "--out", str(tmp_path / "test")], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert 0.0 <= metrics[present] <= 1.0 and absent not in metrics
    assert metrics["subsets"]["all"]["num_images"] == (8 if name == "demo_imagefolder" else 6)
    assert (tmp_path / "test" / "confusion_matrix.png").exists() == (name == "demo_imagefolder")
