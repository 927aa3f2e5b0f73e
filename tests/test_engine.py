"""Training machinery without a whole run: monitor modes, EMA, host synchronisations per step, durable writes,
the disk-cache key, loading checkpoints without pretrained weights, per-rank augmentation seeds, resume rules."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from tests.helpers import REPO
from utils.config import MONITOR_MODES, Config, ConfigError, config_from_dict, load_config, monitor_mode


# ----------------------------------------------------------------------------------------------- monitor
@pytest.mark.parametrize("monitor,mode", [("loss", "min"), ("empty_fp_rate", "min"), ("dice", "max"),
                                          ("combined", "max"), ("f1_glioma", "max")])
def test_monitor_mode_follows_the_metric(monitor, mode):
    assert monitor_mode(load_config(None, [f"train.monitor={monitor}"]).train) == mode


def test_explicit_monitor_mode_wins():
    cfg = load_config(None, ["train.monitor=loss", "train.monitor_mode=max"])
    assert monitor_mode(cfg.train) == "max"


def test_unknown_monitor_is_a_config_error_listing_the_valid_names():
    with pytest.raises(ConfigError, match=r"train\.monitor.*'dic'.*Did you mean 'dice'.*Valid names: loss"):
        load_config(None, ["train.monitor=dic"])


def test_every_monitor_name_is_a_metric_that_validation_returns():
    from datasets import CLASS_NAMES
    from evaluation.inference import evaluate
    from evaluation.metrics import MultiTaskMetrics
    from losses import MultiTaskLoss

    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, 1)

    class Both(nn.Module):
        def forward(self, x):
            return {"cls": x.mean((2, 3)).repeat(1, 2)[:, :4], "seg": model(x)}

    batch = {"image": torch.randn(4, 3, 8, 8), "mask": (torch.rand(4, 1, 8, 8) > 0.5).float(),
             "label": torch.tensor([0, 1, 2, 3]), "has_mask": torch.ones(4, dtype=torch.bool), "id": list("abcd")}
    results = evaluate(Both(), [batch], MultiTaskMetrics(4, CLASS_NAMES), torch.device("cpu"),
                       MultiTaskLoss(Config().loss), show_progress=False)
    assert set(MONITOR_MODES) <= set(results)


# ----------------------------------------------------------------------------------------------- EMA
def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_ema_matches_the_warm_up_reference_without_host_syncs(monkeypatch):
    from engine.ema import build_ema

    torch.manual_seed(0)
    net = _small_net()
    decay = 0.99

    def reference_fn(averaged, current, num_averaged):  # the previous AveragedModel-based definition
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged * d + current * (1.0 - d)

    reference = AveragedModel(net, avg_fn=reference_fn, use_buffers=True)
    ema = build_ema(net, decay)
    syncs = _count_project_syncs(monkeypatch)
    for _ in range(25):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        net.train()(torch.randn(2, 3, 6, 6))  # moves the BatchNorm statistics
        ema.update_parameters(net)
        reference.update_parameters(net)
    assert ema.n_averaged == 25 and isinstance(ema.n_averaged, int)
    ours, ref = ema.module.state_dict(), reference.module.state_dict()
    for name, tensor in ref.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert syncs["ema"] == 0, f"EMA updates read tensors on the host: {syncs}"


# ----------------------------------------------------------------------------------------------- host syncs
_SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist")


def _count_project_syncs(monkeypatch) -> dict:
    """Count device->host reads (item, bool, float, int, tolist) made by the project's own code."""
    counts = {"project": 0, "ema": 0}
    venv = str(Path(sys.prefix).resolve())

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(REPO)) and not caller.startswith(venv) and "/tests/" not in caller:
                counts["project"] += 1
                if caller.endswith(os.path.join("engine", "ema.py")):
                    counts["ema"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in _SYNC_METHODS:
        wrap(name)
    return counts


class _Batches(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [{"image": torch.randn(3, 32, 32, generator=g), "mask": (torch.rand(1, 32, 32, generator=g)
                       > 0.7).float(), "label": torch.tensor(i % 4), "has_mask": torch.tensor(True), "id": str(i)}
                      for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _syncs_for_steps(steps: int, monkeypatch) -> int:
    from engine.ema import build_ema
    from engine.loops import TrainContext, train_one_epoch
    from engine.optim import LRSchedule, build_optimizer
    from losses import MultiTaskLoss
    from model import build_model

    torch.manual_seed(0)
    cfg = Config()
    model = build_model("efficient_mtnet", num_classes=4)
    optimizer = build_optimizer(model, cfg.optim)
    loader = DataLoader(_Batches(2 * steps), batch_size=2)
    ctx = TrainContext(loss_fn=MultiTaskLoss(cfg.loss), optimizer=optimizer,
                       schedule=LRSchedule(optimizer, cfg.sched, steps, 1), device=torch.device("cpu"),
                       grad_clip=1.0, ema=build_ema(model, 0.99), log_every=1000, show_progress=False)
    with monkeypatch.context() as patch:
        counts = _count_project_syncs(patch)
        train_one_epoch(model, loader, ctx, epoch=1, should_stop=lambda: False)
    return counts["project"]


def test_training_steps_make_no_host_syncs_between_log_steps(monkeypatch):
    # The reads at the end of the epoch (and at its last, logged step) are fixed; none may grow with the steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    try:
        assert _syncs_for_steps(2, monkeypatch) == _syncs_for_steps(4, monkeypatch)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- durable writes
@pytest.mark.parametrize("writer", ["checkpoint", "json"])
def test_atomic_writes_fsync_the_file_before_and_the_folder_after_the_rename(writer, tmp_path, monkeypatch):
    from utils.checkpoint import atomic_save
    from utils.runs import write_json_atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / ("last.pth" if writer == "checkpoint" else "best_val.json")
    if writer == "checkpoint":
        atomic_save({"x": torch.ones(2)}, target)
        assert torch.load(target, weights_only=True)["x"].sum() == 2
    else:
        write_json_atomic({"dice": 0.5}, target)
    assert events == [("fsync", "file"), ("replace", target.name), ("fsync", "dir")]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


# ----------------------------------------------------------------------------------------------- disk cache key
def test_disk_cache_key_covers_mtime_and_decode_settings(tmp_path):
    from datasets.cache import cache_key, decode_settings
    from datasets.index import Sample

    image = tmp_path / "brisc2025_train_00001_gl_ax_t1.jpg"
    image.write_bytes(b"\xff" * 100)
    samples = [Sample("s", 0, "ax", image, None)]
    key = cache_key(samples, decode_settings(64))
    assert cache_key(samples, decode_settings(64)) == key
    stat = image.stat()
    image.write_bytes(b"\x00" * 100)  # edited in place, same size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = cache_key(samples, decode_settings(64))
    assert edited != key
    assert cache_key(samples, decode_settings(128)) != edited
    assert cache_key(samples, decode_settings(64, {"resize": "letterbox"})) != edited


# ----------------------------------------------------------------------------------------------- loading
def test_checkpoint_loads_without_its_pretrained_weights_file(tmp_path):
    from model import build_model
    from model.loading import load_model_from_checkpoint
    from utils.checkpoint import atomic_save
    from utils.config import config_to_dict

    cfg = config_from_dict({"model": {"name": "light_unet", "pretrained": str(tmp_path / "gone" / "encoder.pth")}})
    net = build_model("light_unet", num_classes=4)
    atomic_save({"model": net.state_dict(), "config": config_to_dict(cfg), "model_name": "light_unet"},
                tmp_path / "best.pth")
    model, loaded_cfg, _ = load_model_from_checkpoint(tmp_path / "best.pth")
    assert loaded_cfg.model.pretrained.endswith("encoder.pth")
    for name, tensor in net.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------------------------- summary
def test_summary_line_without_an_evaluated_epoch():
    from engine.logs import summary_line

    line = summary_line(0, "time budget of 0.01 min spent", "dice", None, 0, 0.1)
    assert "no best dice" in line and "0 epochs" in line
    assert "best dice 0.8000 at epoch 3" in summary_line(3, "finished", "dice", 0.8, 3, 1.0)


# ----------------------------------------------------------------------------------------------- rank seeds
class _RandomAugment(Dataset):
    """Stands in for an augmenting dataset: each item is a draw from the worker's random state."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> float:
        return float(torch.rand(()).item() + np.random.rand())


def _epoch_draws(rank: int, epoch: int) -> list[float]:
    from engine.loaders import seed_epoch
    from utils.runtime import seed_worker

    generator = torch.Generator()
    loader = DataLoader(_RandomAugment(), batch_size=4, num_workers=2, worker_init_fn=seed_worker,
                        generator=generator, shuffle=False)
    seed_epoch(loader, None, generator, seed=42, epoch=epoch, rank=rank)
    return [x for batch in loader for x in batch.tolist()]


def test_augmentation_streams_differ_between_ranks_and_repeat_per_rank():
    rank0, rank1 = _epoch_draws(0, 1), _epoch_draws(1, 1)
    assert rank0 != rank1, "every rank drew the same augmentations"
    assert _epoch_draws(1, 1) == rank1  # reproducible (resume)
    assert _epoch_draws(1, 2) != rank1


# ----------------------------------------------------------------------------------------------- resume rules
def test_resume_changes_allowed_keys_and_refuses_the_others():
    from engine.resume import apply_changes

    run = config_from_dict({"train": {"epochs": 2}})
    user = config_from_dict({"train": {"epochs": 5}, "eval": {"tta": True}, "optim": {"lr": 0.5}})
    cfg, changes = apply_changes(run, user, {"train.epochs", "eval"})
    assert cfg.train.epochs == 5 and cfg.eval.tta is True and cfg.optim.lr == run.optim.lr
    assert changes == {"train.epochs": (2, 5), "eval.tta": (False, True)}
    with pytest.raises(ConfigError, match=r"'optim\.lr' cannot change when a run is resumed"):
        apply_changes(run, user, {"train.epochs", "optim.lr"})
