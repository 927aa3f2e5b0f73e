"""Duplicate detection: pixel digests, thumbnail correlation, groups, leaks, the manifest and its cache."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import datasets.duplicates as dup
from datasets.check import main as check_main
from datasets.duplicates import (
    NEAR_THRESHOLD,
    DuplicateGroup,
    correlation,
    find_groups,
    leaked_stems,
    pixel_digest,
    read_manifest,
    thumbnail,
    write_manifest,
)
from datasets.index import Sample, index_split
from tests.helpers import SHARED_BRISC


def _slice(seed: int, shape=(96, 80)) -> np.ndarray:
    """A smooth random grey image (distinct seeds give uncorrelated images)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 5)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def _write(root: Path, split: str, stem: str, image: np.ndarray, suffix: str = ".png") -> Sample:
    folder = root / "classification_task" / split / "glioma"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{suffix}"
    ok, data = cv2.imencode(suffix, image, [cv2.IMWRITE_JPEG_QUALITY, 90] if suffix == ".jpg" else [])
    assert ok
    path.write_bytes(data.tobytes())
    return Sample(stem=stem, label=0, plane="ax", image=path, mask=None)


def test_digest_matches_reencoded_copies_only(tmp_path):
    original = _write(tmp_path, "train", "a", _slice(0), ".jpg")
    decoded = cv2.imread(str(original.image), cv2.IMREAD_GRAYSCALE)
    copy = _write(tmp_path, "train", "b", decoded, ".png")  # other bytes, same pixels
    assert original.image.read_bytes() != copy.image.read_bytes()
    assert pixel_digest(original.image) == pixel_digest(copy.image)
    changed = decoded.copy()
    changed[0, 0] ^= 1
    assert pixel_digest(_write(tmp_path, "train", "c", changed).image) != pixel_digest(copy.image)
    # the same bytes in another shape are other pixels
    assert pixel_digest(_write(tmp_path, "train", "d", decoded.reshape(decoded.shape[1], -1)).image) \
        != pixel_digest(copy.image)


def test_thumbnail_correlation_separates_copies_from_other_images(tmp_path):
    image = _slice(1)
    brighter = _write(tmp_path, "train", "b", np.clip(image.astype(int) * 0.9 + 12, 0, 255).astype(np.uint8))
    rescaled = _write(tmp_path, "train", "c", cv2.resize(image, (160, 192), interpolation=cv2.INTER_LINEAR))
    other = _write(tmp_path, "train", "d", _slice(2))
    base = thumbnail(_write(tmp_path, "train", "a", image).image)
    assert base.shape == (32, 32) and base.dtype == np.float32
    assert correlation(base, thumbnail(brighter.image)) > 0.999
    assert correlation(base, thumbnail(rescaled.image)) > NEAR_THRESHOLD
    assert correlation(base, thumbnail(other.image)) < 0.9
    assert correlation(base, np.full_like(base, 7.0)) == 0.0  # a flat thumbnail matches nothing


@pytest.fixture()
def planted(tmp_path) -> tuple[list[Sample], list[Sample]]:
    """Train: a, b == a (re-encoded), c, d ~ c (brighter), e. Test: t1 == a, t2 ~ e, t3 new."""
    images = {k: _slice(10 + k) for k in range(5)}
    train = [_write(tmp_path, "train", "a", images[0]), _write(tmp_path, "train", "b", images[0], ".jpg"),
             _write(tmp_path, "train", "c", images[2]),
             _write(tmp_path, "train", "d", np.clip(images[2].astype(int) + 9, 0, 255).astype(np.uint8)),
             _write(tmp_path, "train", "e", images[4])]
    decoded_b = cv2.imread(str(train[1].image), cv2.IMREAD_GRAYSCALE)
    train[0] = _write(tmp_path, "train", "a", decoded_b)  # a: PNG of b's decoded JPEG pixels
    test = [_write(tmp_path, "test", "t1", decoded_b),
            _write(tmp_path, "test", "t2", cv2.resize(images[4], (120, 100))),
            _write(tmp_path, "test", "t3", _slice(99))]
    return train, test


def test_find_groups_links_exact_and_near_within_and_across_splits(planted):
    train, test = planted
    groups = find_groups(train + test)
    kinds = {g.stems: (g.kind, g.splits) for g in groups}
    # members are ordered by (split, stem): "test" sorts before "train"
    assert kinds == {("t1", "a", "b"): ("exact", ("test", "train", "train")),
                     ("c", "d"): ("near", ("train", "train")),
                     ("t2", "e"): ("near", ("test", "train"))}
    exact_only = find_groups(train + test, near_threshold=None)
    assert [set(g.stems) for g in exact_only] == [{"a", "b", "t1"}]


def test_leaked_stems_lists_training_matches(planted, tmp_path):
    train, test = planted
    assert leaked_stems(test, train, cache_dir=tmp_path / "cache") == {"t1": ["a", "b"], "t2": ["e"]}
    assert leaked_stems(test, train, near_threshold=None) == {"t1": ["a", "b"]}
    # an image is not its own leak, but its copies are
    assert leaked_stems(train[:1], train) == {"a": ["b"]}


def test_fingerprints_are_cached_and_refreshed_when_a_file_changes(planted, tmp_path, monkeypatch):
    train, test = planted
    cache = tmp_path / "cache"
    first = leaked_stems(test, train, cache_dir=cache)
    assert len(list(cache.glob("fingerprints_*.npz"))) == 2

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(dup, "read_grey", no_decoding)
    assert leaked_stems(test, train, cache_dir=cache) == first
    monkeypatch.undo()
    test[2].image.write_bytes(train[4].image.read_bytes())  # t3 becomes a byte copy of e: new size/mtime
    assert leaked_stems(test, train, cache_dir=cache)["t3"] == ["e"]


def test_manifest_round_trip_and_counts(planted, tmp_path):
    train, test = planted
    groups = find_groups(train + test)
    path = tmp_path / "out" / "manifest.json"
    write_manifest(groups, path, extra={"root": "x"})
    again, data = read_manifest(path)
    assert again == groups and all(isinstance(g, DuplicateGroup) for g in again)
    assert data["near_threshold"] == NEAR_THRESHOLD and data["root"] == "x"
    counts = data["counts"]
    assert counts["exact"] == {"groups": 1, "images": 3, "within": {}, "across": {"groups": 1, "images": 3}}
    assert counts["near"]["within"] == {"train": {"groups": 1, "images": 2}}
    assert counts["near"]["across"] == {"groups": 1, "images": 2}


def test_check_writes_the_manifest_of_planted_copies(planted_root, tmp_path, capsys):
    planted = json.loads((planted_root / "SYNTHETIC.json").read_text())["planted"]
    path = tmp_path / "manifest.json"
    assert check_main([str(planted_root), "--manifest", str(path)]) == 0
    out = capsys.readouterr().out
    assert "result: OK" in out and f"duplicate manifest {path}" in out  # the usual report, then the summary
    assert "test: 3 of 8 images have an identical training image, 0 more a near-identical one" in out
    groups, data = read_manifest(path)
    assert data["counts"]["exact"]["within"] == {"train": {"groups": 3, "images": 6}}
    assert data["counts"]["exact"]["across"] == {"groups": 3, "images": 6}
    assert data["leaked_from_train"]["test"]["train_matches"] == {k: [v] for k, v in planted["test_leaks"].items()}
    assert data["images"] == {"test": 8, "train": 24}
    assert {frozenset(g.stems) for g in groups} == {frozenset(p) for kind in planted.values() for p in kind.items()}


@pytest.mark.skipif(not SHARED_BRISC.is_dir(), reason="real BRISC 2025 data not present")
def test_real_sample_has_five_leaked_test_images(tmp_path):
    test = index_split(SHARED_BRISC, "test")
    train = index_split(SHARED_BRISC, "train")
    leaks = leaked_stems(test, train, cache_dir=tmp_path)
    assert len(leaks) == 5
    assert leaks["brisc2025_test_00834_pi_co_t1"] == ["brisc2025_train_04218_pi_co_t1"]
