"""Single-task runs: segmentation only (`loss.cls_weight: 0`) and classification only, through the config checks,
the loss, the metrics, train.py, test.py and the results table: the absent task gets no figures, never zeros."""
from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import f1_score

from evaluation.inference import predict
from evaluation.metrics import MultiTaskMetrics
from losses import MultiTaskLoss
from model import build_model
from model.loading import assign_tasks
from tests.helpers import REPO, copy_test_images, run_entry
from utils.cli import run_main
from utils.config import ConfigError, LossConfig, config_from_dict, load_config

SEG_CONFIG = "configs/baselines/mobilenetv2_unet_seg.yaml"
TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "data.split.val_fraction=0.25", "data.loader.cache=none",
        "eval.batch_size=16", "train.device=cpu", "train.threads=1", "train.epochs=1", "train.image_log_every=1"]
CLS_KEYS = {"accuracy", "f1_macro", "precision_macro", "recall_weighted", "confusion_matrix", "f1_glioma"}


pytestmark = pytest.mark.usefixtures("one_thread")  # models are timed and trained on one thread


# --------------------------------------------------------------------------------------------- config and model
@pytest.mark.parametrize("loss, monitor, task", [({"cls_weight": 0}, "accuracy", "classification"),
                                                 ({"cls_weight": 0}, "f1_glioma", "classification"),
                                                 ({"seg_weight": 0, "aux_weights": []}, "dice", "segmentation"),
                                                 ({"seg_weight": 0, "aux_weights": []}, "empty_fp_rate",
                                                  "segmentation")])
def test_monitoring_a_metric_of_the_absent_task_is_a_config_error(loss, monitor, task):
    with pytest.raises(ConfigError, match=rf"train\.monitor.*{monitor}.*{task} metric"):
        config_from_dict({"loss": loss, "train": {"monitor": monitor}})
    for fine in ("combined", "loss"):
        assert config_from_dict({"loss": loss, "train": {"monitor": fine}}).train.monitor == fine


def test_the_seg_only_recipe_config():
    cfg = load_config(REPO / SEG_CONFIG)
    assert (cfg.model.name, cfg.data.preprocess.image_size, cfg.data.loader.batch_size, cfg.optim.lr, cfg.train.epochs) == (
        "mobilenetv2_unet", 256, 8, 1e-4, 30)
    assert cfg.loss.cls_weight == 0 and cfg.loss.seg.bce > 0 and cfg.loss.seg.dice > 0 and cfg.loss.seg.tversky > 0
    assert (cfg.loss.seg.tversky_alpha, cfg.loss.seg.tversky_beta) == (0.3, 0.7)


def test_assign_tasks_drops_the_untrained_head_from_predictions():
    cfg = config_from_dict({"model": {"name": "light_unet", "deep_supervision": False},
                            "loss": {"cls_weight": 0, "aux_weights": []}, "train": {"monitor": "dice"}})
    model = build_model("light_unet", num_classes=4, deep_supervision=False).eval()
    assert set(model(torch.randn(1, 3, 32, 32))) == {"cls", "seg"}  # the head exists ...
    assert assign_tasks(model, cfg) == ("seg",)
    with torch.no_grad():
        for tta in (False, True):
            assert set(predict(model, torch.randn(2, 3, 32, 32), tta=tta)) == {"seg"}  # ... but is not scored

    from visualization.cases import _case_caption, _predict_cases

    masks, classes = _predict_cases(model, torch.randn(2, 3, 32, 32), 0.5, (32, 32))
    assert masks.shape == (2, 32, 32) and classes == [None, None]  # no class caption from the untrained head
    assert _case_caption(masks[0], masks[0], "").startswith(("Dice", "no false"))

    cls_model = build_model("efficientnet_b0_cls")
    with pytest.raises(ConfigError, match=r"loss\.seg_weight.*no segmentation output"):
        assign_tasks(cls_model, config_from_dict({"model": {"name": "efficientnet_b0_cls"}}))


# --------------------------------------------------------------------------------------------- loss and metrics
def _seg_batch(n: int = 3, size: int = 8) -> dict:
    torch.manual_seed(1)
    mask = (torch.rand(n, 1, size, size) > 0.6).float()
    return {"label": torch.arange(n) % 4, "mask": mask, "has_mask": torch.ones(n, dtype=torch.bool),
            "id": [f"img{i}" for i in range(n)]}


def test_loss_without_a_class_output():
    batch = _seg_batch()
    seg = torch.randn(3, 1, 8, 8, requires_grad=True)
    total, terms = MultiTaskLoss(LossConfig(cls_weight=0.0, aux_weights=[]))({"seg": seg}, batch)
    assert "cls" not in terms and total.item() == pytest.approx(terms["seg"].item())
    total.backward()
    assert seg.grad is not None
    with pytest.raises(ConfigError, match=r"no classification output.*loss\.cls_weight=0"):
        MultiTaskLoss(LossConfig(aux_weights=[]))({"seg": seg}, batch)


def test_metrics_without_a_class_output_report_segmentation_only():
    batch = _seg_batch()
    seg = torch.randn(3, 1, 8, 8)
    alone, both = MultiTaskMetrics(4, keep_per_image=True), MultiTaskMetrics(4)
    alone.update({"seg": seg}, batch)
    both.update({"seg": seg, "cls": torch.randn(3, 4)}, batch)
    results, reference = alone.compute(), both.compute()
    assert not CLS_KEYS & set(results)  # no accuracy of 0, no empty confusion matrix
    assert {k: v for k, v in reference.items() if k not in CLS_KEYS and not k.startswith(
        ("precision", "recall", "f1"))} == results
    assert all(r["pred"] is None and r["prob"] is None and r["dice"] is not None for r in alone.per_image_records())
    with pytest.raises(ValueError, match="some batches"):
        alone.update({"seg": seg, "cls": torch.randn(3, 4)}, batch)


def test_classification_only_metrics_still_match_scikit_learn():
    metrics = MultiTaskMetrics(4)
    logits = torch.randn(6, 4)
    labels = [0, 1, 2, 3, 2, 1]
    metrics.update({"cls": logits}, {**_seg_batch(6), "label": torch.tensor(labels)})
    assert metrics.compute()["f1_macro"] == pytest.approx(
        f1_score(labels, logits.argmax(1).tolist(), average="macro", zero_division=0))


# --------------------------------------------------------------------------------------------- end to end
def test_a_monitor_of_the_absent_task_fails_before_a_run_directory_exists(tiny_brisc, tmp_path, capsys):
    import train

    code = run_main(train.main, ["--config", str(REPO / SEG_CONFIG), "--no-progress", "--opts",
                                 f"data.root={tiny_brisc}", f"experiment.work_dir={tmp_path}", "train.monitor=accuracy",
                                 *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: config key 'train.monitor': 'accuracy' is a classification metric")
    assert not any(tmp_path.iterdir())


def test_segmentation_only_run_trains_tests_and_tabulates_without_class_figures(tiny_brisc, tmp_path, capsys):
    proc = run_entry(["train.py", "--config", SEG_CONFIG, "--no-progress", "--opts", f"data.root={tiny_brisc}",
                      f"experiment.work_dir={tmp_path}", "experiment.name=seg", "train.monitor=combined", *TINY],
                     cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "seg" / "latest"
    history = json.loads((run_dir / "history.json").read_text())
    assert {"train/seg", "train/seg_tversky", "val/dice", "val/combined"} <= set(history[0])
    assert history[0]["val/combined"] == history[0]["val/dice"]  # the mean of the tasks present
    assert history[0]["train/accuracy"] is None
    assert not any(key.startswith(("train/cls", "val/accuracy", "val/f1", "val/precision")) for key in history[0])
    assert " acc " not in (run_dir / "train.log").read_text()

    from evaluation.pipeline import TestOptions, run_test

    out = run_dir / "test_seg"
    run_test(TestOptions(checkpoint=run_dir / "best.pth", out_dir=out, num_workers=0, tta=True, bootstrap=50,
                         show_progress=False))
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 16 and 0.0 <= metrics["dice"] <= 1.0 and metrics["calibration"] is None
    assert not CLS_KEYS & set(metrics) and metrics["ci95"]["accuracy"] is None
    assert all(group.get("accuracy") is None for group in metrics["breakdowns"]["class"].values())
    assert not (out / "confusion_matrix.png").exists() and not (out / "classification_report.txt").exists()
    assert (out / "breakdowns.png").is_file()
    assert "Dice" in printed and "Accuracy" not in printed and "Per-class report" not in printed
    rows = (out / "per_image.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["stem", "subset", "plane"] and "dice" in header  # no class columns at all
    assert not {"true_class", "pred_class", "correct"} & set(header) and not any(h.startswith("prob_") for h in header)

    with pytest.raises(ConfigError, match="--calibrate.*trains no classifier"):
        run_test(TestOptions(checkpoint=run_dir / "best.pth", out_dir=tmp_path / "cal", num_workers=0,
                             calibrate=True, show_progress=False))

    from prediction.folder import predict_folder

    folder = copy_test_images(tiny_brisc, tmp_path / "unlabelled")
    predict_folder(run_dir / "best.pth", folder, tmp_path / "pred", runtime="torch")
    lines = (tmp_path / "pred" / "predictions.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and lines[0] == "file,tumour_pixels,status,error"  # no class columns
    assert len(list((tmp_path / "pred" / "masks").iterdir())) == 2

    from evaluation.readme_table import main as results_main

    assert results_main([str(run_dir), "--folder", "test_seg", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| mobilenetv2_unet |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "–" and cells[6] == "–"  # accuracy and macro-F1 (leak-free): empty, not 0
    assert cells[7] not in ("–", "0.00")  # Dice is there


class _SegOnlyNet(torch.nn.Module):
    """A model without a class head (`tasks = ("seg",)`): its output has no `cls` key."""

    tasks = ("seg",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"seg": self.conv(x)}


def test_a_model_without_a_class_head_trains_and_evaluates():
    from evaluation.inference import evaluate

    cfg = config_from_dict({"loss": {"cls_weight": 0, "aux_weights": []}, "train": {"monitor": "combined"}})
    model = _SegOnlyNet()
    assert assign_tasks(model, cfg) == ("seg",)
    with pytest.raises(ConfigError, match=r"loss\.cls_weight.*no classification output"):
        assign_tasks(_SegOnlyNet(), config_from_dict({"train": {"monitor": "combined"}}))
    batch = {**_seg_batch(4, 16), "image": torch.randn(4, 3, 16, 16)}
    total, terms = MultiTaskLoss(cfg.loss)(model(batch["image"]), batch)
    total.backward()
    assert "cls" not in terms and model.conv.weight.grad is not None
    results = evaluate(model, [batch, batch], MultiTaskMetrics(4), torch.device("cpu"), MultiTaskLoss(cfg.loss),
                       show_progress=False)
    assert not CLS_KEYS & set(results) and results["num_images"] == 8
    assert results["combined"] == results["dice"] and results["loss"] == pytest.approx(total.item(), rel=1e-5)
    with torch.no_grad():
        assert set(predict(model, batch["image"], tta=True)) == {"seg"}
