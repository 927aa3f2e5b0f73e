"""Three roles for three splits: the held-out dev_test part (data.split.test_dev_fraction), scan groups, split roles."""
from __future__ import annotations

import json

import numpy as np
import pytest

from datasets.splits import carve_dev_test, load_split, make_split, split_role
from utils.config import load_config


def stems_labels(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [f"im{i:03d}" for i in range(n)], rng.integers(0, 4, n).tolist()


def test_dev_test_is_stratified_grouped_and_leaves_val_unchanged():
    stems, labels = stems_labels()
    groups = [[f"im{i:03d}", f"im{i + 1:03d}", f"im{i + 2:03d}"] for i in range(0, 60, 3)]
    split = make_split(stems, labels, 0.1, 42, groups)
    carved = carve_dev_test(split, stems, labels, 0.1, 42, groups)
    assert carved["val"] == split["val"]  # turning dev_test on never changes the selection split
    assert set(carved["train"]) | set(carved["dev_test"]) == set(split["train"])
    assert not set(carved["train"]) & set(carved["dev_test"])
    label_of = dict(zip(stems, labels))
    for c in range(4):  # stratified: about 10 % of each class of the release
        expected = round(labels.count(c) * 0.1)
        assert abs(sum(label_of[s] == c for s in carved["dev_test"]) - expected) <= 3
    for group in groups:  # each group on one side
        sides = {("dev" if s in carved["dev_test"] else "val" if s in carved["val"] else "train") for s in group}
        assert len(sides) == 1


def test_split_roles():
    assert [split_role(s) for s in ("train", "val", "dev_test", "test")] == ["training", "selection", "held out",
                                                                            "held out"]
    with pytest.raises(ValueError):
        split_role("validation")


def test_a_run_with_dev_test_never_reads_it_in_training(tiny_brisc, tmp_path, monkeypatch):
    import datasets.decode as decode
    from datasets.factory import build_eval_dataset, build_train_val

    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_brisc}", "data.generated.enabled=false", "data.preprocess.image_size=32",
                                            "data.loader.num_workers=0", "data.loader.cache=none", "data.split.test_dev_fraction=0.2"])
    split_path = tmp_path / "split.json"
    train, val = build_train_val(cfg.data, split_path, verbose=False)
    split = json.loads(split_path.read_text())
    dev = set(split["dev_test"])
    assert dev and split["test_dev_fraction"] == 0.2 and load_split(split_path)["dev_test"] == split["dev_test"]
    read = []
    original = decode.read_grey  # every decode of a sample (datasets.decode.load_sample, the caches) goes here
    monkeypatch.setattr(decode, "read_grey", lambda path, *a, **k: (read.append(str(path)), original(path, *a, **k))[1])
    for dataset in (train, val):  # every image the training loop and the selection pass can reach
        for i in range(len(dataset)):
            dataset[i]
    by_stem = {s.stem: str(s.image) for s in build_eval_dataset(cfg.data, "dev_test", split_path, verbose=False).samples}
    assert set(by_stem) == dev
    assert read and not set(read) & set(by_stem.values())
    assert not {s.stem for s in train.samples} & dev and not {s.stem for s in val.samples} & dev


def test_scan_group_ids_chain_similar_images(planted_root):
    from datasets.duplicates import find_groups, scan_group_ids
    from datasets.index import index_split

    samples = index_split(planted_root, "train")
    ids = scan_group_ids(samples, threshold=0.99)
    assert len(ids) == len(samples)
    for group in find_groups(samples, 0.99):  # the planted copies share one id; other images their own
        assert len({ids[[s.stem for s in samples].index(stem)] for stem in group.stems}) == 1
    assert len(np.unique(ids)) == len(samples) - sum(len(g.stems) - 1 for g in find_groups(samples, 0.99))
    coarser = scan_group_ids(samples, threshold=0.5)  # a lower threshold only merges groups
    assert len(np.unique(coarser)) <= len(np.unique(ids))


def test_a_split_file_with_dev_test_overlapping_train_is_refused(tmp_path):
    from datasets.errors import DataError

    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "dev_test": ["b"]}))
    with pytest.raises(DataError, match="both train and dev_test"):
        load_split(path)
