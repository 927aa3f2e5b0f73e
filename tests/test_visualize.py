"""Figures: every PNG exists and has sane content; Grad-CAM explains the requested class at the right place."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from model import build_model, list_models, register_model
from datasets.naming import CLASS_NAMES
from visualization import __main__ as cli
from visualization import architecture, cases, common, confusion, curves, gradcam
from utils.checkpoint import atomic_save
from utils.config import Config, config_to_dict
from visualization.gradcam import gradcam_heatmaps, resolve_target_layer

torch.set_num_threads(1)

TINY_NAME = "visualize_test_net"


class TinyNet(nn.Module):
    """The smallest model that honours the output contract and exposes `encoder_stages()`."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, deep_supervision: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()))
        self.seg_head = nn.Conv2d(16, 1, 1)
        self.cls_head = nn.Linear(16, num_classes)
        self.deep_supervision = deep_supervision

    def encoder_stages(self) -> list[nn.Module]:
        return list(self.encoder)

    def forward(self, x: torch.Tensor) -> dict:
        features = self.encoder(x)
        seg = self.seg_head(features)
        out = {"cls": self.cls_head(features.mean((2, 3))),
               "seg": F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)}
        if self.training and self.deep_supervision:
            out["aux"] = [seg]
        return out


if TINY_NAME not in list_models():
    register_model(TINY_NAME)(TinyNet)


class BrightnessNet(nn.Module):
    """Class 0's logit is the mean of a feature map that follows the input brightness: its Grad-CAM must
    light up where the image is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.stage.weight.fill_(1.0)
            self.stage.bias.zero_()
        self.encoder = nn.Sequential(self.stage)

    def encoder_stages(self) -> list[nn.Module]:
        return [self.stage]

    def forward(self, x: torch.Tensor) -> dict:
        evidence = self.stage(x).mean((1, 2, 3))
        cls = torch.stack([evidence, torch.zeros_like(evidence)], 1)
        return {"cls": cls, "seg": torch.zeros_like(x[:, :1])}


def assert_sane_png(path: Path, min_width: int = 200, min_height: int = 150) -> np.ndarray:
    """The file exists, PIL reads it, it is reasonably sized and not a single colour."""
    path = Path(path)
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width >= min_width and height >= min_height, (path, image.size)
    assert width <= 6000 and height <= 8000, (path, image.size)
    assert pixels.std() > 5, path
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, path  # more than text on a flat background
    return pixels


def _disc_masks(count: int, size: int, centre: tuple[int, int], radius: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < radius ** 2).float()
    return disc[None, None].repeat(count, 1, 1, 1)


class ListDataset(torch.utils.data.Dataset):
    """Batch-contract samples held in memory (no `samples`/`labels` index: the generic path is used)."""

    def __init__(self, per_class: int, size: int = 32, labels: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for label in labels:
            for k in range(per_class):
                mask = _disc_masks(1, size, (10 + k, 12), 6)[0] if label != 2 else torch.zeros(1, size, size)
                self.items.append({"image": torch.randn(3, size, size, generator=gen), "mask": mask,
                                   "label": torch.tensor(label), "has_mask": torch.tensor(True),
                                   "id": f"case_{label}_{k}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


# --------------------------------------------------------------------------------------------- overlays
def test_case_grid(tmp_path):
    images = torch.randn(3, 3, 48, 48)
    truth = _disc_masks(3, 48, (20, 20), 10)
    truth[1] = 0  # an empty ground truth must not break the outline drawing
    pred = _disc_masks(3, 48, (24, 22), 9)
    path = cases.save_case_grid(images, truth, pred, [f"brisc_{i}\nDice 0.{i}" for i in range(3)],
                            tmp_path / "sub" / "cases.png", suptitle="worst cases")
    assert path == tmp_path / "sub" / "cases.png"
    pixels = assert_sane_png(path)
    assert pixels.shape[0] > pixels.shape[1]  # three rows of three columns plus headers: taller than wide
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red.sum() > 50  # the prediction outline is drawn

    with pytest.raises(ValueError, match="titles"):
        cases.save_case_grid(images, truth, pred, ["only one"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="masks_pred"):
        cases.save_case_grid(images, truth, pred[:2], ["a", "b", "c"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"size \(24, 24\) do not match images of size \(48, 48\)"):
        cases.save_case_grid(images, truth, pred[:, :, ::2, ::2], ["a", "b", "c"], tmp_path / "bad.png")


def test_confusion_matrix(tmp_path):
    cm = [[50, 2, 0, 1], [3, 40, 1, 0], [0, 0, 60, 0], [1, 0, 0, 70]]
    fig = confusion.confusion_matrix_figure(cm, CLASS_NAMES)
    assert isinstance(fig, Figure)
    title = fig.axes[0].get_title()
    assert "228 images" in title and f"{220 / 228:.2%}" in title
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"50", "40", "60", "70", "0"} <= texts
    normalised = confusion.confusion_matrix_figure(cm, CLASS_NAMES, normalize=True)
    assert f"{50 / 53:.1%}\n(50)" in {t.get_text() for t in normalised.axes[0].texts}

    assert_sane_png(confusion.save_confusion_matrix(np.array(cm), CLASS_NAMES, tmp_path / "cm.png", normalize=True))
    with pytest.raises(ValueError, match="does not fit 3 class names"):
        confusion.confusion_matrix_figure(cm, ["a", "b", "c"])


# --------------------------------------------------------------------------------------------- curves
def _history(epochs: int = 6) -> list[dict]:
    return [{"epoch": e, "lr": 1e-3, "time_s": 3.0, "train/total": 2 / e, "train/cls": 1 / e, "train/seg": 1 / e,
             "train/seg_bce": 0.5 / e, "train/seg_dice": 0.5 / e, "train/aux_0": 0.8 / e,
             "train/accuracy": 1 - 1 / (e + 1), "train/images_per_s": 40.0, "val/loss": 2.2 / e,
             "val/accuracy": 1 - 1.2 / (e + 1), "val/dice": 0.8 - 0.5 / e, "val/iou": 0.7 - 0.5 / e,
             "val/f1_macro": 0.9 - 0.3 / e}
            for e in range(1, epochs + 1)]


def test_loss_terms_are_told_from_other_training_figures():
    keys = ["train/total", "train/cls", "train/seg", "train/seg_dice", "train/aux_1", "train/accuracy",
            "train/images_per_s", "val/loss", "lr", "time_s"]
    assert [k for k in keys if curves._is_loss_term(k)] == ["train/total", "train/cls", "train/seg", "train/seg_dice",
                                                        "train/aux_1"]


def test_training_curves(tmp_path):
    history = _history(5)
    history[1]["val/dice"] = None  # a missing value is skipped, not plotted as zero
    assert curves._series(history, "val/dice") == ([1, 3, 4, 5], [history[i]["val/dice"] for i in (0, 2, 3, 4)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text(json.dumps(history))
    assert curves._load_history(run) == (history, f"{tmp_path.name}/run") and curves._load_history(history) == (history, "")
    path = cli.main(["curves", "--run", str(run)])
    assert path == run / "curves.png"
    assert_sane_png(path, min_width=800)

    with pytest.raises(FileNotFoundError, match="history.json"):
        curves.plot_training_curves(tmp_path / "nowhere", tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        curves.plot_training_curves([], tmp_path / "x.png")


# --------------------------------------------------------------------------------------------- Grad-CAM
def test_gradcam_localises_the_evidence_and_restores_the_model():
    model = BrightnessNet().train()
    images = torch.full((2, 3, 32, 32), -1.0)
    images[0, :, 2:10, 3:11] = 2.0  # bright square top-left
    images[1, :, 20:30, 18:28] = 2.0  # bright square bottom-right
    result = gradcam_heatmaps(model, images, target_classes=[0, 0])
    assert result.heatmaps.shape == (2, 32, 32)
    assert result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1 + 1e-6
    for heat, (rows, cols) in zip(result.heatmaps, [(slice(2, 10), slice(3, 11)), (slice(20, 30), slice(18, 28))]):
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        assert rows.start <= y < rows.stop and cols.start <= x < cols.stop
        inside = np.zeros_like(heat, dtype=bool)
        inside[rows, cols] = True
        assert heat[inside].mean() > 3 * heat[~inside].mean()
    # The caller's model is left as it was: training mode, trainable, no stray gradients.
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_gradcam_targets_and_layers():
    torch.manual_seed(0)
    model = TinyNet().eval()
    images = torch.randn(3, 3, 32, 32)
    predicted = model(images)["cls"].argmax(1).tolist()
    default = gradcam_heatmaps(model, images)
    assert default.target_classes == default.predicted_classes == predicted
    explicit = gradcam_heatmaps(model, images, target_classes=predicted)
    np.testing.assert_allclose(default.heatmaps, explicit.heatmaps, atol=1e-6)
    other = [(c + 1) % 4 for c in predicted]
    assert not np.allclose(gradcam_heatmaps(model, images, target_classes=other).heatmaps, default.heatmaps)
    np.testing.assert_allclose(default.probabilities.sum(1), 1.0, atol=1e-5)

    assert resolve_target_layer(model) is model.encoder[1]
    assert resolve_target_layer(model, "encoder.0") is model.encoder[0]
    by_name = gradcam_heatmaps(model, images, target_layer="encoder.0")
    assert not np.allclose(by_name.heatmaps, default.heatmaps)
    with pytest.raises(ValueError, match="encoder.0, encoder.1"):
        resolve_target_layer(model, "decoder.9")
    with pytest.raises(ValueError, match="outside 0..3"):
        gradcam_heatmaps(model, images, target_classes=[0, 1, 7])

    overlays = gradcam.gradcam_overlays(model, images)
    assert len(overlays) == 3
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in overlays)


def test_write_gradcam_figures(tmp_path):
    torch.manual_seed(0)
    dataset = ListDataset(per_class=3, labels=(0, 2, 3))  # no meningioma image: that figure is skipped
    assert common.dataset_labels(dataset) == [0, 0, 0, 2, 2, 2, 3, 3, 3]
    assert common.dataset_ids(torch.utils.data.Subset(dataset, [4, 0])) == ["case_2_1", "case_0_0"]
    paths = gradcam.write_gradcam_figures(TinyNet(), dataset, tmp_path / "gradcam", per_class=2, device="cpu")
    assert [p.name for p in paths] == ["gradcam_glioma.png", "gradcam_no_tumor.png", "gradcam_pituitary.png"]
    for path in paths:
        assert_sane_png(path, min_width=300, min_height=300)


def test_select_cases_covers_every_class_deterministically():
    labels = [0] * 10 + [1] * 3 + [2] * 1 + [3] * 6
    chosen = cases.select_cases(labels, 7)
    assert chosen == cases.select_cases(labels, 7)
    assert len(chosen) == len(set(chosen)) == 7
    assert sorted({labels[i] for i in chosen}) == [0, 1, 2, 3]
    assert [labels[i] for i in chosen] == sorted(labels[i] for i in chosen)  # grouped by class
    assert len(cases.select_cases(labels, 100)) == len(labels)
    assert common.spread_indices(list(range(10)), 3) == [0, 4, 9]
    assert common.spread_indices([7, 8], 5) == [7, 8]


# --------------------------------------------------------------------------------------------- checkpoint comparison
def _tiny_checkpoint(run_dir: Path, image_size: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = TinyNet()
    cfg = Config()
    cfg.model.name = TINY_NAME
    cfg.data.root = "moved/elsewhere"  # --data-root must take over
    cfg.data.preprocess.image_size = image_size
    run_dir.mkdir(parents=True)
    path = run_dir / "best.pth"
    atomic_save({"format_version": 1, "model_name": TINY_NAME, "config": config_to_dict(cfg),
                 "model": model.state_dict(), "ema": None}, path)
    return path


def test_compare_command(tiny_brisc, tmp_path):
    first = _tiny_checkpoint(tmp_path / "runs" / "a", image_size=48, seed=0)
    second = _tiny_checkpoint(tmp_path / "runs" / "b", image_size=64, seed=1)
    out = tmp_path / "figs" / "comparison.png"
    path = cli.main(["compare", "--checkpoints", str(first), str(second), "--data-root", str(tiny_brisc),
                   "--num", "5", "--out", str(out), "--labels", "small", "large"])
    assert path == out
    pixels = assert_sane_png(out, min_width=600, min_height=600)
    assert pixels.shape[0] > pixels.shape[1]  # five rows of four columns

    with pytest.raises(SystemExit):
        cli.main(["compare", "--checkpoints", str(first), "--labels", "a", "b"])


# --------------------------------------------------------------------------------------------- architecture
@pytest.mark.skipif("efficient_mtnet" not in list_models(), reason="EfficientMTNet is not registered")
def test_architecture_figure_reads_the_model(tmp_path):
    model = build_model("efficient_mtnet").train()
    running_mean = model.encoder_stages()[0][1].running_mean.clone()
    info = architecture.describe_architecture(model, image_size=64)
    assert [s.stride for s in info.stages] == [2, 4, 8, 16, 32]
    last_convs = [[m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1] for stage in model.encoder_stages()]
    assert [s.channels for s in info.stages] == [conv.out_channels for conv in last_convs]
    assert info.decoder_strides == [4, 8, 16, 32] and info.aux_strides == [8, 16]
    assert info.total_params == sum(p.numel() for p in model.parameters())
    assert sum(s.params for s in info.stages) + info.context_params + info.decoder_params + info.seg_head_params \
        + info.aux_params + info.cls_head_params + info.stem_level_params == info.total_params
    assert "NMF rank" in info.context and info.num_classes == 4 and info.gflops > 0
    # The probe ran on a copy: the caller's batch-norm statistics and mode are untouched.
    assert torch.equal(model.encoder_stages()[0][1].running_mean, running_mean) and model.training

    path = architecture.draw_architecture(tmp_path / "architecture.png", model=model, image_size=64)
    assert_sane_png(path, min_width=1500, min_height=900)
    with pytest.raises(ValueError, match="has no context, decoder"):
        architecture.describe_architecture(TinyNet())


@pytest.mark.skipif("efficient_mtnet" not in list_models(), reason="EfficientMTNet is not registered")
def test_architecture_default_is_the_configured_headline_model():
    """Without a model the figure describes the headline config's model (stride-2 mask level, 1,389,151
    parameters), not the constructor defaults (stride 4, 1,385,359)."""
    configured = architecture.configured_model()
    info = architecture.describe_architecture(image_size=64)
    assert info.total_params == sum(p.numel() for p in configured.parameters())
    assert info.seg_stride == 2 and info.stem_level_params > 0
    assert info.total_params != sum(p.numel() for p in build_model("efficient_mtnet").parameters())
