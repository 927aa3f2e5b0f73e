"""Grouped, stratified train/val splits and K folds; planted duplicates in generated data."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from datasets import build_train_val
from datasets.duplicates import find_groups, leaked_stems
from datasets.index import index_split
from datasets.splits import fold_split, load_split, make_folds, make_split
from datasets.synthetic import generate
from utils.config import ConfigError, DataConfig, LoaderConfig, PreprocessConfig, SplitConfig, config_from_dict

STEMS = [f"s{i:03d}" for i in range(200)]
LABELS = [i % 4 for i in range(200)]
LABEL_OF = dict(zip(STEMS, LABELS))
# nine groups of three class-0 images, one mixed-class pair
GROUPS = [[f"s{i:03d}", f"s{i + 4:03d}", f"s{i + 8:03d}"] for i in range(0, 108, 12)] + [["s197", "s198"]]


def _per_class(stems) -> list[int]:
    return [sum(LABEL_OF[s] == k for s in stems) for k in range(4)]


@pytest.mark.parametrize("seed", range(6))
def test_grouped_split_keeps_groups_together_and_stays_stratified(seed):
    split = make_split(STEMS, LABELS, 0.2, seed, GROUPS)
    val = set(split["val"])
    assert all(len({s in val for s in g}) == 1 for g in GROUPS)  # never separated
    assert set(split["train"]) | val == set(STEMS) and not set(split["train"]) & val
    assert _per_class(val) == [10, 10, 10, 10]  # the singletons fill up to the exact class counts
    assert split["group_duplicates"] and split["duplicate_groups"] == len(GROUPS)


def test_grouped_split_is_deterministic_and_order_free():
    a = make_split(STEMS, LABELS, 0.2, 3, GROUPS)
    order = list(zip(STEMS, LABELS))[::-1]
    b = make_split([s for s, _ in order], [l for _, l in order], 0.2, 3, [g[::-1] for g in GROUPS[::-1]])
    assert a == b
    assert make_split(STEMS, LABELS, 0.2, 4, GROUPS)["val"] != a["val"]


def test_an_ungrouped_split_separates_a_group_that_a_grouped_one_keeps():
    separated = [seed for seed in range(10)
                 if any(len({s in set(make_split(STEMS, LABELS, 0.2, seed)["val"]) for s in g}) == 2 for g in GROUPS)]
    assert separated  # without groups, copies land on both sides


@pytest.mark.parametrize("folds", [2, 5])
def test_folds_cover_every_image_once_grouped_and_stratified(folds):
    assignment = make_folds(STEMS, LABELS, folds, 7, GROUPS)
    assert sorted(assignment) == STEMS and set(assignment.values()) == set(range(folds))
    assert all(len({assignment[s] for s in g}) == 1 for g in GROUPS)
    for k in range(4):
        counts = Counter(f for s, f in assignment.items() if LABEL_OF[s] == k)
        assert max(counts.values()) - min(counts.values()) <= 1 + (3 if k == 0 else 1)
    vals = [set(fold_split(STEMS, LABELS, folds, f, 7, GROUPS)["val"]) for f in range(folds)]
    assert set().union(*vals) == set(STEMS) and sum(map(len, vals)) == len(STEMS)
    assert make_folds(STEMS, LABELS, folds, 7, GROUPS) == assignment
    with pytest.raises(ValueError, match="fold"):
        fold_split(STEMS, LABELS, folds, folds, 7, GROUPS)


def test_fold_config_is_validated():
    with pytest.raises(ConfigError, match="data.split.folds"):
        config_from_dict({"data": {"split": {"folds": 1}}})
    with pytest.raises(ConfigError, match="data.split.fold"):
        config_from_dict({"data": {"split": {"folds": 3, "fold": 3}}})
    with pytest.raises(ConfigError, match="data.preprocess.resize"):
        config_from_dict({"data": {"preprocess": {"resize": "crop"}}})


# ----------------------------------------------------------------------------------------------- planted data
def test_generator_plants_pixel_copies_and_records_them(planted_root):
    planted = json.loads((planted_root / "SYNTHETIC.json").read_text())["planted"]
    assert len(planted["train_duplicates"]) == 3 and len(planted["test_leaks"]) == 3
    train, test = index_split(planted_root, "train"), index_split(planted_root, "test")
    assert set(leaked_stems(test, train)) == set(planted["test_leaks"])  # the leak-free subset drops exactly these
    assert leaked_stems(test, train) == {k: [v] for k, v in planted["test_leaks"].items()}
    within = [set(g.stems) for g in find_groups(train) if g.kind == "exact"]
    assert sorted(map(sorted, within)) == sorted(sorted(p) for p in planted["train_duplicates"].items())
    copy = next(s for s in train if s.stem in planted["train_duplicates"])
    assert copy.image.suffix == ".png" and (copy.mask is None or copy.mask.is_file())


def test_default_generation_plants_nothing(tmp_path):
    generate(tmp_path / "d", 8, 4, seed=1, verbose=False)
    assert "planted" not in json.loads((tmp_path / "d" / "SYNTHETIC.json").read_text())
    assert all(p.parent.name == "masks" for p in (tmp_path / "d").rglob("*.png"))  # images stay JPEG


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factory_split_keeps_planted_duplicates_together(planted_root, tmp_path, seed):
    planted = json.loads((planted_root / "SYNTHETIC.json").read_text())["planted"]["train_duplicates"]
    cfg = DataConfig(root=str(planted_root), preprocess=PreprocessConfig(image_size=32),
                     split=SplitConfig(val_fraction=0.5, seed=seed), loader=LoaderConfig(cache_dir=str(tmp_path / "cache")))
    build_train_val(cfg, tmp_path / "run" / "split.json", verbose=False)
    split = load_split(tmp_path / "run" / "split.json")
    assert split["group_duplicates"] and split["near_threshold"] == 0.99 and split["duplicate_groups"] >= 3
    val = set(split["val"])
    assert all((a in val) == (b in val) for a, b in planted.items())


def test_factory_split_without_grouping_says_so(planted_root, tmp_path):
    cfg = DataConfig(root=str(planted_root), preprocess=PreprocessConfig(image_size=32),
                     split=SplitConfig(val_fraction=0.5, group_duplicates=False))
    build_train_val(cfg, tmp_path / "run" / "split.json", verbose=False)
    split = load_split(tmp_path / "run" / "split.json")
    assert not split["group_duplicates"] and split["duplicate_groups"] == 0 and "near_threshold" not in split
    assert not (tmp_path / "cache").exists()


def test_factory_folds(planted_root, tmp_path):
    vals = []
    for fold in range(2):
        cfg = DataConfig(root=str(planted_root), preprocess=PreprocessConfig(image_size=32),
                         split=SplitConfig(folds=2, fold=fold), loader=LoaderConfig(cache_dir=str(tmp_path / "c")))
        train, val = build_train_val(cfg, tmp_path / f"f{fold}" / "split.json", verbose=False)
        assert not set(train.stems) & set(val.stems)
        vals.append(set(val.stems))
    assert vals[0] | vals[1] == {s.stem for s in index_split(planted_root, "train")} and not vals[0] & vals[1]
    assert load_split(tmp_path / "f1" / "split.json")["fold"] == 1
