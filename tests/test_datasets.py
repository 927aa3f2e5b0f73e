"""Tests of the data pipeline on a tiny generated BRISC-layout dataset (and the real sample when present)."""
from __future__ import annotations

import json
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from datasets import CLASS_NAMES, BriscDataset, DataError, build_eval_dataset, build_train_val, ensure_data_root
from datasets.cache import pack, unpack
from datasets.brisc_integrity import _jpeg_channels, check_dataset
from datasets.check import main as check_main
from datasets.decode import read_grey, resize_mask
from datasets.index import index_split
from datasets.naming import BriscNameError, format_name, parse_name
from datasets.splits import load_split, make_split, save_split
from datasets.synthetic import class_counts, generate
from datasets.transforms import build_transform, channel_stats, train_pipeline
from utils.config import AugmentConfig, DataConfig, GeneratedDataConfig, PreprocessConfig, SplitConfig

REAL_ROOT = Path(__file__).resolve().parents[2] / "shared/data/brisc2025"
N_TRAIN, N_TEST = 24, 8
GEOMETRY_ONLY = AugmentConfig(
    p_hflip=0.5, p_vflip=0.5, p_rotate=1.0, p_shift_scale=1.0, p_elastic=1.0, p_random_resized_crop=1.0,
    p_brightness_contrast=0.0, p_gamma=0.0, p_noise=0.0, p_blur=0.0,
)
EVERYTHING = AugmentConfig(
    p_hflip=0.5, p_vflip=0.5, p_rotate=1.0, p_shift_scale=1.0, p_elastic=1.0, p_random_resized_crop=1.0,
    p_brightness_contrast=1.0, p_gamma=1.0, p_noise=1.0, p_blur=1.0,
)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brisc") / "synthetic"
    generate(root, N_TRAIN, N_TEST, seed=3, verbose=False)
    return root


@pytest.fixture()
def data_copy(data_root, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(data_root, tmp_path / "copy"))


def _files(root: Path, split: str, class_name: str) -> list[Path]:
    return sorted((root / "classification_task" / split / class_name).glob("*.jpg"))


# ----------------------------------------------------------------------------------------------- naming
@pytest.mark.parametrize("code,label", [("gl", 0), ("me", 1), ("no", 2), ("nt", 2), ("pi", 3)])
@pytest.mark.parametrize("plane", ["ax", "co", "sa"])
def test_parse_name_codes_and_planes(code, label, plane):
    name = parse_name(f"/x/brisc2025_test_00042_{code}_{plane}_t1.jpg")
    assert (name.split, name.index, name.label, name.plane) == ("test", 42, label, plane)
    assert name.class_name == CLASS_NAMES[label]
    assert name.stem == f"brisc2025_test_00042_{code}_{plane}_t1"


@pytest.mark.parametrize(
    "bad",
    [
        "brisc2025_train_00001_xx_ax_t1.jpg",  # unknown code
        "brisc2025_train_00001_gl_zz_t1.jpg",  # unknown plane
        "brisc2025_train_0001_gl_ax_t1.jpg",  # 4-digit index
        "brisc2025_train_00001_gl_ax.jpg",  # no sequence suffix
        "brisc2024_train_00001_gl_ax_t1.jpg",  # other release
        "image.jpg",
    ],
)
def test_parse_name_rejects_bad_names(bad):
    with pytest.raises(BriscNameError, match="brisc2025|unknown"):
        parse_name(bad)


def test_format_name_round_trip():
    stem = format_name("train", 1, 0, "ax")
    assert stem == "brisc2025_train_00001_gl_ax_t1"
    assert parse_name(stem + ".png").label == 0


# ----------------------------------------------------------------------------------------------- synthetic + index
def test_generated_layout_and_index(data_root):
    info = json.loads((data_root / "SYNTHETIC.json").read_text())
    assert info["seed"] == 3 and info["train"] == N_TRAIN
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        samples = index_split(data_root, split)
        counts = [sum(s.label == k for s in samples) for k in range(4)]
        assert counts == class_counts(n, split) and sum(counts) == n
        # one contiguous index range per class, in the release's order gl, me, no, pi
        indices = [parse_name(s.stem).index for s in samples]
        assert indices == list(range(1, n + 1))
        assert [s.label for s in samples] == sorted(s.label for s in samples)
        for s in samples:
            assert (s.mask is None) == (s.label == 2) and s.has_mask
        seg_stems = {p.stem for p in (data_root / "segmentation_task" / split / "masks").glob("*.png")}
        assert seg_stems == {s.stem for s in samples if s.label != 2}
        assert {p.stem for p in (data_root / "segmentation_task" / split / "images").glob("*.jpg")} == seg_stems


def test_class_counts_follow_release_proportions():
    assert class_counts(5000, "train") == [1147, 1329, 1067, 1457]
    assert class_counts(1000, "test") == [254, 306, 140, 300]
    assert class_counts(4, "test") == [1, 1, 1, 1]


def test_generated_files_look_like_the_release(data_root):
    masks = sorted((data_root / "segmentation_task/train/masks").glob("*.png"))
    values = set()
    for path in masks:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        image = read_grey(data_root / "segmentation_task/train/images" / f"{path.stem}.jpg")
        assert mask.ndim == 2 and mask.shape == image.shape
        assert np.count_nonzero(mask >= 128) > 0
        values |= set(np.unique(mask).tolist())
    assert values <= set(range(0, 8)) | set(range(248, 256))
    assert values - {0, 255}, "masks should carry JPEG-like ringing values"
    channels = {_jpeg_channels(p) for p in (data_root / "classification_task/train").rglob("*.jpg")}
    assert channels == {1, 3}
    sizes = {read_grey(p).shape for p in (data_root / "classification_task/train").rglob("*.jpg")}
    assert len(sizes) > 1


def test_generation_is_deterministic_and_atomic(tmp_path):
    generate(tmp_path / "a", 4, 4, seed=7, verbose=False)
    generate(tmp_path / "b", 4, 4, seed=7, verbose=False)
    generate(tmp_path / "c", 4, 4, seed=8, verbose=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folder left
    with pytest.raises(FileExistsError):
        generate(tmp_path / "a", 4, 4, seed=7, verbose=False)


# ----------------------------------------------------------------------------------------------- dataset
def test_samples_follow_the_batch_contract(data_root):
    ds = BriscDataset(data_root, "train", image_size=64, train=True, augment=EVERYTHING, verbose=False)
    assert len(ds) == N_TRAIN and ds.class_names == CLASS_NAMES
    assert ds.labels == [s.label for s in ds.samples] and len(ds.stems) == N_TRAIN
    assert sum(ds.class_counts().values()) == N_TRAIN and sum(ds.plane_counts().values()) == N_TRAIN
    batch = next(iter(DataLoader(ds, batch_size=8, shuffle=False)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (8, 1, 64, 64) and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["label"].dtype == torch.long and batch["has_mask"].dtype == torch.bool
    assert batch["id"] == ds.stems[:8]
    assert "glioma" in ds.summary() and "planes" in ds.summary()


def test_mask_pairing_and_has_mask(data_copy):
    samples = index_split(data_copy, "train")
    dropped = next(s for s in samples if s.label == 1)
    (data_copy / "segmentation_task/train/masks" / f"{dropped.stem}.png").unlink()
    with pytest.warns(UserWarning, match="1 tumour image"):
        ds = BriscDataset(data_copy, "train", image_size=32, verbose=False)
    for i, stem in enumerate(ds.stems):
        item = ds[i]
        if stem == dropped.stem:
            assert not item["has_mask"] and item["mask"].sum() == 0
        elif item["label"] == 2:
            assert item["has_mask"] and item["mask"].sum() == 0
        else:
            assert item["has_mask"] and item["mask"].sum() > 0


def test_stems_restrict_the_dataset(data_root):
    ds = BriscDataset(data_root, "train", image_size=32, verbose=False)
    subset = ds.stems[::3]
    part = BriscDataset(data_root, "train", image_size=32, stems=subset, verbose=False)
    assert part.stems == subset
    with pytest.raises(DataError, match="not in"):
        BriscDataset(data_root, "train", image_size=32, stems=["brisc2025_train_09999_gl_ax_t1"], verbose=False)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_channel_layouts(data_root, in_channels):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ds = BriscDataset(data_root, "test", image_size=48, in_channels=in_channels, mean=mean, std=std, verbose=False)
    image = ds[0]["image"]
    assert image.shape == (in_channels, 48, 48)
    m, s = channel_stats(mean, std, in_channels)
    pixels = torch.stack([image[c] * s[c] + m[c] for c in range(in_channels)])  # back to 0..1
    assert torch.allclose(pixels, pixels[:1].expand_as(pixels), atol=1e-5)  # the same grey in every channel
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 + 1e-5
    assert m == ([float(np.mean(mean))] if in_channels == 1 else mean)


def test_both_jpeg_layouts_decode_to_the_same_grey(tmp_path):
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    cv2.imwrite(str(tmp_path / "one.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 100])
    cv2.imwrite(str(tmp_path / "three.jpg"), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    one, three = read_grey(tmp_path / "one.jpg"), read_grey(tmp_path / "three.jpg")
    assert _jpeg_channels(tmp_path / "one.jpg") == 1 and _jpeg_channels(tmp_path / "three.jpg") == 3
    assert one.shape == three.shape == (64, 64)
    assert np.abs(one.astype(int) - three.astype(int)).max() <= 2


# ----------------------------------------------------------------------------------------------- transforms
def test_geometric_augmentations_keep_the_mask_on_its_image(data_root):
    sample = next(s for s in index_split(data_root, "train") if s.label == 1)
    mask = (read_grey(sample.mask) >= 128).astype(np.uint8) * 255
    image = cv2.resize(mask, (96, 96), interpolation=cv2.INTER_NEAREST)  # an image that *is* its mask
    mask = image.copy()
    pipeline = train_pipeline(96, GEOMETRY_ONLY)
    pipeline.set_random_seed(0)
    moved = 0
    for _ in range(10):
        out = pipeline(image=image, mask=mask)
        img_fg, mask_fg = out["image"] >= 128, out["mask"] >= 128
        assert set(np.unique(out["mask"]).tolist()) <= {0, 255}  # nearest-neighbour: still binary
        # the image is resampled linearly and the mask by nearest neighbour, four times in a row:
        # their outlines agree within two pixels (a misaligned mask would be off by far more)
        near_img = cv2.dilate(img_fg.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        near_mask = cv2.dilate(mask_fg.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert near_img[mask_fg].mean() > 0.98 and near_mask[img_fg].mean() > 0.98
        moved += not np.array_equal(mask_fg, mask >= 128)
    assert moved >= 8  # the transforms did move things


def test_all_augmentations_give_binary_masks_and_vary(data_root):
    transform = build_transform(64, train=True, augment=EVERYTHING)
    sample = next(s for s in index_split(data_root, "train") if s.label == 0)
    image = cv2.resize(read_grey(sample.image), (64, 64))
    mask = resize_mask(read_grey(sample.mask), 64)
    outs = [transform(image, mask) for _ in range(4)]
    for img, m in outs:
        assert img.shape == (3, 64, 64) and m.shape == (1, 64, 64)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(outs[0][0], outs[1][0])
    eval_t = build_transform(64, train=False)
    assert torch.equal(eval_t(image, mask)[0], eval_t(image, mask)[0])


def test_workers_draw_different_augmentations(data_root):
    ds = BriscDataset(data_root, "train", image_size=32, train=True, augment=EVERYTHING, verbose=False)
    loader = DataLoader(Subset(ds, [0] * 4), batch_size=1, num_workers=2)
    images = [b["image"] for b in loader]
    assert not torch.equal(images[0], images[1])  # batches 0 and 1 come from different workers


def test_resize_mask_keeps_tiny_tumours():
    mask = np.zeros((512, 512), np.uint8)
    mask[100:102, 200:202] = 255  # 4 pixels: less than half of any 64x64 output pixel
    small = resize_mask(mask, 64)
    assert set(np.unique(small).tolist()) == {0, 255} and 1 <= np.count_nonzero(small) <= 2
    assert np.count_nonzero(resize_mask(np.zeros((512, 512), np.uint8), 64)) == 0


# ----------------------------------------------------------------------------------------------- cache
def test_cache_row_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (13, 13), dtype=np.uint8)
    mask = np.where(rng.random((13, 13)) > 0.5, 255, 0).astype(np.uint8)
    back_image, back_mask = unpack(pack(image, mask), 13)
    assert np.array_equal(back_image, image) and np.array_equal(back_mask, mask)


def test_cache_gives_the_same_tensors(data_root, tmp_path):
    kwargs = dict(image_size=40, verbose=False)
    plain = BriscDataset(data_root, "train", **kwargs)
    ram = BriscDataset(data_root, "train", cache="ram", **kwargs)
    disk = BriscDataset(data_root, "train", cache="disk", cache_dir=tmp_path, **kwargs)
    files = list(tmp_path.glob("*.cache"))
    assert len(files) == 1 and files[0].name.startswith("train_40px_")
    for i in range(len(plain)):
        a, b, c = plain[i], ram[i], disk[i]
        for key in ("image", "mask"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    # reused, not rewritten; readable from DataLoader workers
    stamp = files[0].stat().st_mtime_ns
    again = BriscDataset(data_root, "train", cache="disk", cache_dir=tmp_path, **kwargs)
    assert files[0].stat().st_mtime_ns == stamp and again.cache.path == files[0]
    batch = next(iter(DataLoader(again, batch_size=len(again), num_workers=2)))
    assert torch.equal(batch["image"], torch.stack([plain[i]["image"] for i in range(len(plain))]))


# ----------------------------------------------------------------------------------------------- splits
def test_split_is_stratified_and_deterministic(tmp_path):
    stems = [f"s{i:03d}" for i in range(200)]
    labels = [i % 4 for i in range(200)]
    a = make_split(stems, labels, 0.2, seed=1)
    shuffled = list(zip(stems, labels))[::-1]
    b = make_split([s for s, _ in shuffled], [l for _, l in shuffled], 0.2, seed=1)
    assert a == b
    assert make_split(stems, labels, 0.2, seed=2)["val"] != a["val"]
    assert set(a["train"]) | set(a["val"]) == set(stems) and not set(a["train"]) & set(a["val"])
    label_of = dict(zip(stems, labels))
    assert [sum(label_of[s] == k for s in a["val"]) for k in range(4)] == [10, 10, 10, 10]
    assert a["seed"] == 1 and a["val_fraction"] == 0.2
    save_split(a, tmp_path / "run" / "split.json")
    assert load_split(tmp_path / "run" / "split.json") == a
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["split.json"]


def test_load_split_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_split(tmp_path / "bad.json")
    (tmp_path / "shape.json").write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(DataError, match="'train' and 'val'"):
        load_split(tmp_path / "shape.json")


# ----------------------------------------------------------------------------------------------- factory
def test_factory_draws_saves_and_reuses_the_split(data_root, tmp_path):
    cfg = DataConfig(root=str(data_root), preprocess=PreprocessConfig(image_size=32),
                     split=SplitConfig(val_fraction=0.25, seed=5))
    split_path = tmp_path / "run" / "split.json"
    train, val = build_train_val(cfg, split_path, verbose=False)
    assert train.train and not val.train and split_path.is_file()
    assert sorted(train.stems + val.stems) == sorted(index_split(data_root, "train")[i].stem for i in range(N_TRAIN))
    assert set(val.labels) == {0, 1, 2, 3}  # every class in validation
    saved = load_split(split_path)
    cfg.split.seed = 6  # ignored on resume: the saved split wins
    train2, val2 = build_train_val(cfg, split_path, verbose=False)
    assert val2.stems == val.stems == saved["val"]
    assert build_eval_dataset(cfg, "val", split_path, verbose=False).stems == val.stems
    assert len(build_eval_dataset(cfg, "test", None, verbose=False)) == N_TEST
    assert len(build_eval_dataset(cfg, "train", None, verbose=False)) == N_TRAIN
    with pytest.raises(DataError, match="split file"):
        build_eval_dataset(cfg, "val", None, verbose=False)
    # an explicit split file is copied into a new run directory
    cfg.split.file = str(split_path)
    _, val3 = build_train_val(cfg, tmp_path / "run2" / "split.json", verbose=False)
    assert val3.stems == val.stems and (tmp_path / "run2" / "split.json").is_file()


def test_ensure_data_root(tmp_path):
    missing = DataConfig(root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="python -m datasets.synthetic --out DIR") as err:
        ensure_data_root(missing)
    assert "briscdataset/brisc2025" in str(err.value)
    cfg = DataConfig(root=str(tmp_path / "gen"), generated=GeneratedDataConfig(enabled=True, train=4, test=4))
    assert ensure_data_root(cfg) == tmp_path / "gen"
    assert (tmp_path / "gen" / "classification_task" / "test" / "pituitary").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]
    assert ensure_data_root(cfg) == tmp_path / "gen"  # second call: reused


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_broken_layouts(data_copy):
    with pytest.raises(DataError, match="split folder"):
        BriscDataset(data_copy, "val", verbose=False)
    for path in _files(data_copy, "test", "meningioma"):
        path.unlink()
    with pytest.raises(DataError, match="meningioma.*no images"):
        BriscDataset(data_copy, "test", verbose=False)
    wrong = _files(data_copy, "train", "glioma")[0]
    wrong.rename(wrong.with_name(wrong.name.replace("_gl_", "_pi_")))
    with pytest.raises(DataError, match="'glioma' folder but its name says 'pituitary'"):
        BriscDataset(data_copy, "train", verbose=False)


def test_unknown_code_is_an_error(data_copy):
    path = _files(data_copy, "train", "glioma")[0]
    path.rename(path.with_name(path.name.replace("_gl_", "_xx_")))
    with pytest.raises(DataError, match="unknown class code 'xx'"):
        index_split(data_copy, "train")


def test_unreadable_files_are_named(data_copy):
    samples = index_split(data_copy, "train")
    broken = next(s for s in samples if s.label == 0)
    broken.image.write_bytes(b"not a jpeg")
    ds = BriscDataset(data_copy, "train", image_size=32, verbose=False)
    with pytest.raises(DataError, match=broken.image.name):
        ds[ds.stems.index(broken.stem)]
    with pytest.raises(DataError, match=broken.image.name):
        BriscDataset(data_copy, "train", image_size=32, cache="ram", verbose=False)
    other = next(s for s in samples if s.label == 3)
    cv2.imwrite(str(other.mask), np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=f"{other.mask.name}' is 12x10"):
        ds[ds.stems.index(other.stem)]


# ----------------------------------------------------------------------------------------------- checker
def test_checker_passes_generated_data(data_root, capsys):
    assert check_main([str(data_root)]) == 0
    assert "result: OK" in capsys.readouterr().out


def test_nt_alias_is_read_and_flagged(data_copy):
    path = _files(data_copy, "train", "no_tumor")[0]
    path.rename(path.with_name(path.name.replace("_no_", "_nt_")))
    stem = path.stem.replace("_no_", "_nt_")
    ds = BriscDataset(data_copy, "train", image_size=32, verbose=False)
    assert ds.labels[ds.stems.index(stem)] == 2
    report = check_dataset(data_copy)
    assert report.ok and len(report.warnings["alias code 'nt' (the release writes 'no')"]) == 1


def test_checker_reports_a_broken_copy(data_copy, capsys):
    train = index_split(data_copy, "train")
    gl = [s for s in train if s.label == 0]
    gl[0].image.write_bytes(b"\xff\xd8 truncated")  # unreadable image
    cv2.imwrite(str(gl[1].mask), np.zeros((20, 20), np.uint8))  # size mismatch
    me = next(s for s in train if s.label == 1)
    image_shape = read_grey(me.image).shape
    cv2.imwrite(str(me.mask), np.full(image_shape, 9, np.uint8))  # empty after the threshold
    pi = [s for s in train if s.label == 3]
    pi[0].image.rename(pi[0].image.with_name(pi[0].image.name.replace("_pi_", "_me_")))  # folder/code
    pi[1].image.rename(pi[1].image.with_name(pi[1].image.name.replace("_pi_", "_zz_")))  # unknown code
    no = next(s for s in train if s.label == 2)
    shutil.copyfile(no.image, _files(data_copy, "test", "no_tumor")[0])  # train/test duplicate

    report = check_dataset(data_copy)
    assert not report.ok
    for kind in ("unreadable image", "mask/image size mismatch", "empty tumour mask",
                 "folder/code disagreement", "bad file name or unknown code"):
        assert kind in report.errors, kind
    assert any(gl[0].image.name in d for d in report.errors["unreadable image"])
    assert report.warnings["same content in train and test"] == [
        f"{no.image.name} == {_files(data_copy, 'test', 'no_tumor')[0].name}"
    ]
    assert check_main([str(data_copy)]) == 1
    assert "result: " in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- real sample
@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason="real BRISC 2025 sample not present beside the checkout")
def test_real_sample_counts_and_masks():
    train, test = index_split(REAL_ROOT, "train"), index_split(REAL_ROOT, "test")
    assert [sum(s.label == k for s in train) for k in range(4)] == [1147, 1329, 1067, 1457]
    assert [sum(s.label == k for s in test) for k in range(4)] == [10, 10, 10, 10]
    tumours = [s for s in train + test if s.label != 2]
    assert all(s.mask is not None for s in tumours)

    def foreground(path: Path) -> int:
        return int(np.count_nonzero(read_grey(path, "mask") >= 128))

    with ThreadPoolExecutor(4) as pool:
        empty = [s.stem for s, n in zip(tumours, pool.map(foreground, [s.mask for s in tumours])) if n == 0]
    assert empty == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tumour image has a mask: no warning
        ds = BriscDataset(REAL_ROOT, "test", image_size=64, verbose=False)
    assert all(ds[i]["mask"].sum() > 0 for i in range(len(ds)) if ds.labels[i] != 2)
