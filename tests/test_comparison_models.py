"""The HAC + CASPP U-Net and the classification-only EfficientNet-B0: blocks, gradients, pretrained weights,
and a classification-only run through the loss, the metrics, train.py, test.py and benchmark.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.cli import run_main
import torch
import torch.nn as nn
from sklearn.metrics import accuracy_score, f1_score

from evaluation.inference import predict
from evaluation.metrics import MultiTaskMetrics
from losses import MultiTaskLoss
from model import build_model
from model.freeze import set_encoder_frozen
from model.hac_caspp_unet import CASPP, HACBlock
from model.pretrained import PretrainedWeightsError
from tests.helpers import REPO, copy_test_images, run_entry
from utils.config import ConfigError, LossConfig, OptimConfig

NEW_MODELS = ["hac_caspp_unet", "efficientnet_b0_cls"]


pytestmark = pytest.mark.usefixtures("one_thread")  # models are timed and trained on one thread


# --------------------------------------------------------------------------------------------- the models
@pytest.mark.parametrize("name", NEW_MODELS)
def test_every_parameter_gets_a_gradient_at_an_odd_size(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4).train()
    x = torch.randn(2, 3, 45, 61)
    out = model(x)
    assert out["cls"].shape == (2, 4)
    if name == "efficientnet_b0_cls":
        assert set(out) == {"cls"}
    else:
        assert out["seg"].shape == (2, 1, 45, 61) and "aux" not in out
    loss = out["cls"].logsumexp(1).sum() + sum(v.pow(2).mean() for k, v in out.items() if k == "seg")
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero[:5]
    model.eval()
    with torch.no_grad():
        again = model(torch.randn(1, 3, 33, 47))
    assert again["cls"].shape == (1, 4) and ("seg" not in again or again["seg"].shape == (1, 1, 33, 47))


def test_hac_attention_weights_are_positive_and_sum_to_one_per_channel():
    torch.manual_seed(0)
    block = HACBlock(5, 24).eval()
    x0 = block.entry(torch.randn(3, 5, 17, 19))
    weights = block.attention(block.branch_outputs(x0))
    assert weights.shape == (3, 3, 24, 1, 1)
    assert (weights > 0).all()
    assert torch.allclose(weights.sum(1), torch.ones(3, 24, 1, 1), atol=1e-6)
    # the weights depend on the input (selection, not a fixed average)
    other = block.attention(block.branch_outputs(block.entry(torch.randn(3, 5, 17, 19) * 3)))
    assert not torch.allclose(weights, other)


def test_hac_output_is_the_attention_weighted_sum_of_the_branches():
    torch.manual_seed(1)
    block = HACBlock(4, 16).eval()
    with torch.no_grad():
        block.select.bias.zero_()
        block.select.bias.view(3, 16)[2] = 50.0  # all attention on the third (widest) branch
        x = torch.randn(2, 4, 15, 15)
        x0 = block.entry(x)
        branches = block.branch_outputs(x0)
        assert torch.allclose(block(x), x0 + branches[2], atol=1e-5)


def test_hac_branches_grow_their_receptive_field():
    """Cascaded 3x3 branches with dilations 1, 2, 3: one input pixel reaches radius 1, 3 and 6 of x0."""
    torch.manual_seed(2)
    block = HACBlock(8, 8).eval()
    size, centre = 31, 15
    with torch.no_grad():
        x0 = torch.randn(1, 8, size, size)
        bumped = x0.clone()
        bumped[..., centre, centre] += 10.0
        radii = []
        for a, b in zip(block.branch_outputs(x0), block.branch_outputs(bumped)):
            changed = ((a - b).abs().amax(1)[0] > 1e-6).nonzero()
            radii.append(int((changed - centre).abs().max()))
    assert radii == [1, 3, 6]


def test_caspp_keeps_the_shape_and_uses_image_level_context():
    torch.manual_seed(3)
    module = CASPP(32).eval()
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        y = module(x)
        assert y.shape == x.shape
        # a change far outside every dilated kernel (rate 6 reaches 6 pixels) still moves the output via pooling
        far = x.clone()
        far[..., 0, 0] += 5.0
        assert not torch.allclose(module(far)[..., 8, 10], y[..., 8, 10])


# --------------------------------------------------------------------------------------------- EfficientNet-B0
def test_efficientnet_b0_cls_loads_a_local_timm_checkpoint(tmp_path: Path):
    import timm

    torch.manual_seed(4)
    reference = timm.create_model("efficientnet_b0", num_classes=1000)  # the library's ImageNet layout
    path = tmp_path / "efficientnet_b0.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("efficientnet_b0_cls", pretrained=str(path))
    assert torch.equal(model.encoder.blocks[3][0].conv_pw.weight, reference.blocks[3][0].conv_pw.weight)
    assert torch.equal(model.encoder.conv_head.weight, reference.conv_head.weight)
    assert model.cls_head[-1].out_features == 4  # a new head, not the 1000-class one

    with pytest.raises(FileNotFoundError, match="absent.pth.*efficientnet_b0_cls"):
        build_model("efficientnet_b0_cls", pretrained=str(tmp_path / "absent.pth"))


def test_efficientnet_b0_cls_offline_imagenet_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match=r"efficientnet_b0_cls.*model\.pretrained=/path"):
        build_model("efficientnet_b0_cls", pretrained="imagenet")


def test_efficientnet_b0_cls_freezes_its_first_stages():
    model = build_model("efficientnet_b0_cls").train()
    stages = model.encoder_stages()
    assert len(stages) == 8  # stem + 7 stages
    first_four = sum(p.numel() for stage in stages[:4] for p in stage.parameters())
    frozen, _ = set_encoder_frozen(model, True, stages=4)
    assert frozen == first_four
    assert not model.encoder.conv_stem.weight.requires_grad and model.encoder.blocks[4][0].conv_pw.weight.requires_grad
    model(torch.randn(2, 3, 64, 64))["cls"].sum().backward()
    assert model.encoder.blocks[2][0].conv_pw.weight.grad is None and model.cls_head[-1].weight.grad is not None


# --------------------------------------------------------------------------------------------- no segmentation output
def _cls_batch(labels: list[int], size: int = 8) -> dict:
    n = len(labels)
    return {"label": torch.tensor(labels), "mask": torch.zeros(n, 1, size, size), "has_mask": torch.ones(n, dtype=bool),
            "id": [f"img{i}" for i in range(n)]}


def test_metrics_without_segmentation_output_report_classification_only():
    torch.manual_seed(5)
    metrics = MultiTaskMetrics(4, keep_per_image=True)
    y_true, y_pred = [], []
    for labels in ([0, 1, 2, 3, 1], [2, 2, 0, 3]):
        logits = torch.randn(len(labels), 4)
        metrics.update({"cls": logits}, _cls_batch(labels))
        y_true += labels
        y_pred += logits.argmax(1).tolist()
    results = metrics.compute()
    assert results["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert results["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    seg_keys = {"dice", "iou", "dice_global", "miou_2class", "pixel_accuracy", "empty_fp_rate", "num_seg_images"}
    assert not seg_keys & set(results)
    records = metrics.per_image_records()
    assert len(records) == 9 and all(r["dice"] is None and r["pred_pixels"] is None for r in records)
    with pytest.raises(ValueError, match="some batches"):
        metrics.update({"cls": torch.randn(1, 4), "seg": torch.zeros(1, 1, 8, 8)}, _cls_batch([0]))


def test_loss_scores_classification_alone_and_names_the_keys_otherwise():
    outputs = {"cls": torch.randn(3, 4, requires_grad=True)}
    batch = _cls_batch([0, 3, 1])
    total, terms = MultiTaskLoss(LossConfig(seg_weight=0.0, aux_weights=[]))(outputs, batch)
    assert set(terms) == {"cls", "total"}
    assert total.item() == pytest.approx(nn.functional.cross_entropy(outputs["cls"], batch["label"]).item())
    with pytest.raises(ConfigError, match=r"loss\.seg_weight=0 and loss\.aux_weights=\[\]"):
        MultiTaskLoss(LossConfig())(outputs, batch)


def test_flip_tta_of_a_classification_only_model():
    model = build_model("efficientnet_b0_cls").eval()
    with torch.no_grad():
        out = predict(model, torch.randn(2, 3, 64, 64), tta=True)
    assert set(out) == {"cls"} and torch.allclose(out["cls"].exp().sum(1), torch.ones(2), atol=1e-5)


def test_adam_optimiser_with_l2_weight_decay():
    from engine.optim import build_optimizer

    optimizer = build_optimizer(nn.Linear(3, 2), OptimConfig(name="adam", lr=1e-4, weight_decay=1e-3))
    assert type(optimizer) is torch.optim.Adam
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-3, 0.0]


# --------------------------------------------------------------------------------------------- end to end
TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "data.split.val_fraction=0.25", "data.loader.cache=none",
        "eval.batch_size=16", "train.device=cpu", "train.threads=1", "train.epochs=1", "train.image_log_every=1"]


def test_efficientnet_b0_cls_trains_and_tests_without_segmentation_figures(tiny_brisc, tmp_path, capsys):
    proc = run_entry(["train.py", "--config", "configs/baselines/efficientnet_b0_cls.yaml", "--no-progress", "--opts",
                      f"data.root={tiny_brisc}", f"experiment.work_dir={tmp_path}", "experiment.name=cls",
                      "model.pretrained=null", *TINY], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "cls" / "latest"
    history = json.loads((run_dir / "history.json").read_text())
    assert {"train/cls", "val/accuracy", "val/loss"} <= set(history[0])
    assert not any(key.startswith(("train/seg", "val/dice", "val/iou")) for key in history[0])
    assert "frozen parameters" in (run_dir / "train.log").read_text()

    from evaluation.pipeline import TestOptions, run_test

    out = tmp_path / "test_out"
    options = TestOptions(checkpoint=run_dir / "best.pth", out_dir=out, num_workers=0, tta=True, show_progress=False)
    run_test(options)
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "efficientnet_b0_cls" and metrics["num_images"] == 16
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["threshold"] is None
    assert not {"dice", "iou", "dice_2class", "miou_2class", "sensitivity"} & set(metrics)
    assert "Accuracy" in printed and "Dice" not in printed and "classification only" in printed

    options.tune_threshold = True
    with pytest.raises(ConfigError, match="--tune-threshold.*no segmentation output"):
        run_test(options)

    from prediction.folder import predict_folder

    folder = copy_test_images(tiny_brisc, tmp_path / "unlabelled")
    predict_folder(run_dir / "best.pth", folder, tmp_path / "pred", runtime="torch")
    rows = (tmp_path / "pred" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("file,predicted_class,p_glioma")
    assert not (tmp_path / "pred" / "masks").exists()


def test_efficientnet_b0_cls_offline_training_fails_with_one_line(tiny_brisc, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run_main(train.main, ["--config", str(REPO / "configs/baselines/efficientnet_b0_cls.yaml"), "--no-progress",
                                 "--opts", f"data.root={tiny_brisc}", f"experiment.work_dir={tmp_path}", *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: pretrained='imagenet'") and "model.pretrained=/path/to/encoder.pth" in err


def test_hac_caspp_unet_config_trains_one_epoch(tiny_brisc, tmp_path):
    proc = run_entry(["train.py", "--config", "configs/baselines/hac_caspp_unet.yaml", "--no-progress", "--opts",
                      f"data.root={tiny_brisc}", f"experiment.work_dir={tmp_path}", "experiment.name=hac",
                      "train.amp=none", "train.channels_last=false", *TINY], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    history = json.loads((tmp_path / "hac" / "latest" / "history.json").read_text())
    assert {"train/seg", "val/dice", "val/accuracy"} <= set(history[0])


def test_benchmark_times_training_steps_side_by_side(tmp_path: Path, capsys):
    import benchmark

    out = tmp_path / "bench"
    code = benchmark.main(["--models", "light_unet", "efficientnet_b0_cls", "--device", "cpu", "--image-size", "64",
                           "--batch-sizes", "2", "--repeats", "2", "--warmup", "1", "--threads", "1", "--train-step",
                           "--out", str(out)])
    assert code == 0
    assert "Train step ms (median)" in capsys.readouterr().out
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["light_unet", "efficientnet_b0_cls"]
    assert all(r["train_step_ms"] > 0 for r in rows)
    assert min(r["train_step_ratio"] for r in rows) == 1.0
    fastest = min(rows, key=lambda r: r["train_step_ms"])
    slowest = max(rows, key=lambda r: r["train_step_ms"])
    assert slowest["train_step_ratio"] == pytest.approx(slowest["train_step_ms"] / fastest["train_step_ms"])
