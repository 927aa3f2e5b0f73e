"""The training run behind `train.py`: build everything from a config, train, validate, checkpoint, resume.

Works the same with one process (`python train.py`) and under `torchrun` (DistributedDataParallel; rank 0 logs,
shows progress and writes files; validation counts are summed over ranks).
"""
from __future__ import annotations

import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from datasets import CLASS_NAMES
from datasets.factory import build_train_val
from losses import MultiTaskLoss
from model import build_model
from model.freeze import set_encoder_frozen
from model.loading import load_weights, model_kwargs
from utils.checkpoint import (atomic_save, capture_rng_state, config_of,
                              read_checkpoint, restore_rng_state, unwrap_model)
from utils.config import Config, config_to_dict, save_config
from engine.distributed import (DistInfo, ShardSampler, barrier, broadcast_buffers, broadcast_flag, cleanup_distributed,
                               init_distributed)
from engine.ema import build_ema
from engine.loops import EpochResult, NonFiniteLossError, TrainContext, train_one_epoch
from evaluation.inference import evaluate
from evaluation.metrics import MultiTaskMetrics
from engine.optim import LRSchedule, build_optimizer
from utils.runs import new_run_dir, read_history, setup_logger, write_history, write_json_atomic
from utils.runtime import amp_dtype as select_amp_dtype
from utils.runtime import reseed_augmentations, seed_everything, seed_worker, select_device


def build_loaders(cfg: Config, train_ds, val_ds, dist_info: DistInfo, device: torch.device
                  ) -> tuple[DataLoader, DataLoader, Optional[DistributedSampler], torch.Generator]:
    """Training loader (shuffled; a DistributedSampler under torchrun) and a non-padded sharded validation loader."""
    workers = cfg.data.num_workers
    common = dict(num_workers=workers, pin_memory=cfg.data.pin_memory and device.type == "cuda",
                  worker_init_fn=seed_worker if workers > 0 else None)
    # Persistent workers keep their RNG across epochs, which would make a resumed run diverge from an
    # uninterrupted one; deterministic runs re-create workers each epoch instead.
    persistent = workers > 0 and not cfg.experiment.deterministic
    generator = torch.Generator()
    sampler = None
    if dist_info.enabled:
        sampler = DistributedSampler(train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                     seed=cfg.experiment.seed, drop_last=True)
    train_loader = DataLoader(train_ds, batch_size=cfg.data.batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_ds) > cfg.data.batch_size, generator=generator,
                              persistent_workers=persistent, prefetch_factor=4 if workers > 0 else None, **common)
    val_sampler = ShardSampler(val_ds, dist_info.rank, dist_info.world_size) if dist_info.enabled else None
    val_loader = DataLoader(val_ds, batch_size=cfg.eval.batch_size, shuffle=False, sampler=val_sampler,
                            persistent_workers=persistent, **common)
    return train_loader, val_loader, sampler, generator


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[Path] = None, show_progress: bool = True) -> None:
        self.start_time = time.time()
        self.cfg = cfg
        self.resume_path = resume
        resume_ckpt = None
        if resume is not None:
            resume_ckpt = read_checkpoint(resume)
            # A resumed run continues with the configuration it was started with.
            self.cfg = cfg = config_of(resume_ckpt, resume)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.device = select_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = init_distributed(self.device.type)
        self.run_dir = self._make_run_dir(resume)
        self.log = setup_logger(self.run_dir if self.dist.is_main else None, self.dist.is_main)
        self.show_progress = show_progress and self.dist.is_main
        seed_everything(cfg.experiment.seed + self.dist.rank, cfg.experiment.deterministic)

        # Data: rank 0 draws (or reads) the split first so the other ranks read the same file.
        split_path = self.run_dir / "split.json"
        if self.dist.is_main:
            self.train_ds, self.val_ds = build_train_val(cfg.data, split_path, verbose=True)
        barrier()
        if not self.dist.is_main:
            self.train_ds, self.val_ds = build_train_val(cfg.data, split_path, verbose=False)
        self.train_loader, self.val_loader, self.train_sampler, self.generator = build_loaders(
            cfg, self.train_ds, self.val_ds, self.dist, self.device)

        # Model, loss, optimisation.
        self.model = build_model(cfg.model.name, **model_kwargs(cfg)).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.class_counts = self._class_counts()
        self.loss_fn = MultiTaskLoss(cfg.loss, class_counts=self.class_counts).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.grad_accum_steps)
        self.schedule = LRSchedule(self.optimizer, cfg.sched, steps_per_epoch, cfg.train.epochs, cfg.train.monitor_mode)
        self.amp_dtype = select_amp_dtype(cfg.train, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ema = build_ema(self.model, cfg.train.ema_decay) if cfg.train.ema else None

        self.epoch = 0  # completed epochs
        self.best_metric: Optional[float] = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.planned_epochs = cfg.train.epochs
        self.elapsed_before = 0.0  # training seconds spent before a resume
        self._encoder_frozen = False
        self.history: list[dict] = []
        if resume_ckpt is not None:
            self._restore(resume_ckpt)

        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            if cfg.train.sync_bn and self.device.type == "cuda":
                # Same Parameter objects, so the optimiser built above keeps working.
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            elif cfg.train.sync_bn:
                self.log.warning("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm); ignored on the CPU")
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.model.freeze_encoder_epochs > 0)
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)
        self.writer = self._make_writer()

    # ------------------------------------------------------------------------------------------ set-up
    def _make_run_dir(self, resume: Optional[Path]) -> Path:
        if resume is not None:
            return Path(resume).parent
        run_dir = None
        if self.dist.is_main:
            run_dir = new_run_dir(self.cfg.experiment.work_dir, self.cfg.experiment.name)
        if self.dist.enabled:  # every rank writes into rank 0's directory
            holder = [str(run_dir) if run_dir else None]
            torch.distributed.broadcast_object_list(holder, src=0)
            run_dir = Path(holder[0])
        return run_dir

    def _class_counts(self) -> list[int]:
        labels = self.train_ds.labels
        return [sum(1 for label in labels if label == k) for k in range(self.cfg.model.num_classes)]

    def _make_writer(self):
        if not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir))

    def _restore(self, ckpt: dict) -> None:
        load_weights(self.model, ckpt["model"], str(self.resume_path), ckpt.get("model_name"))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.n_averaged.fill_(ckpt.get("ema_updates", 1))
        self.epoch = ckpt["epoch"]
        self.best_metric, self.best_epoch = ckpt.get("best_metric"), ckpt.get("best_epoch", 0)
        self.bad_epochs = ckpt.get("bad_epochs", 0)
        self.planned_epochs = ckpt.get("planned_epochs", self.cfg.train.epochs)
        self.elapsed_before = ckpt.get("elapsed_s", 0.0)
        self.history = read_history(self.run_dir)[: self.epoch]
        if ckpt.get("rng") and self.dist.rank == 0:
            restore_rng_state(ckpt["rng"])
        self.log.info(f"resumed from {self.resume_path} after epoch {self.epoch}")

    # ------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> dict:
        return {
            "format_version": 1,
            "model_name": self.cfg.model.name,
            "config": config_to_dict(self.cfg),
            "model": unwrap_model(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "planned_epochs": self.planned_epochs,
            "elapsed_s": self.elapsed(),
            "rng": capture_rng_state(),
            "num_params": self.num_params,
            "class_counts": self.class_counts,  # training distribution, for test.py's loss
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    # ------------------------------------------------------------------------------------------ the loop
    def _set_freezing(self, epoch: int) -> None:
        k = self.cfg.model.freeze_encoder_epochs
        frozen_now = epoch <= k
        if k <= 0 or frozen_now == self._encoder_frozen:
            return
        self._encoder_frozen = frozen_now
        frozen, trainable = set_encoder_frozen(self.model, frozen_now, self.cfg.model.freeze_stages)
        state = "frozen" if frozen_now else "unfrozen"
        self.log.info(f"epoch {epoch}: encoder {state}; frozen parameters {frozen:,}, trainable {trainable:,}")

    def _time_left(self) -> float:
        budget = self.cfg.train.time_budget_min * 60.0
        return budget - self.elapsed() if budget > 0 else math.inf

    def _plan_epochs(self, epoch_seconds: list[float]) -> None:
        """With a time budget, shorten the schedule to the epochs that still fit (re-estimated every epoch)."""
        if self.cfg.train.time_budget_min <= 0 or not epoch_seconds:
            return
        per_epoch = sum(epoch_seconds[-3:]) / len(epoch_seconds[-3:])
        fit = self.epoch + int(self._time_left() // per_epoch)
        planned = max(self.epoch, min(self.cfg.train.epochs, fit))
        if planned != self.planned_epochs:
            self.planned_epochs = planned
            self.schedule.set_total_epochs(planned)
            self.log.info(f"time budget: {self._time_left() / 60:.1f} min left, ~{per_epoch:.0f} s per epoch -> "
                          f"training for {planned} epochs")

    def _metrics(self) -> MultiTaskMetrics:
        return MultiTaskMetrics(self.cfg.model.num_classes, CLASS_NAMES, threshold=self.cfg.eval.threshold)

    def _improved(self, value: float) -> bool:
        if self.best_metric is None or not math.isfinite(self.best_metric):
            return math.isfinite(value)
        return value > self.best_metric if self.cfg.train.monitor_mode == "max" else value < self.best_metric

    def fit(self) -> Path:
        cfg = self.cfg
        self.log.info(f"run directory: {self.run_dir}")
        self.log.info(f"model {cfg.model.name}: {self.num_params:,} parameters; device {self.device}"
                      f"{f' x{self.dist.world_size} processes' if self.dist.enabled else ''}; "
                      f"amp {self.amp_dtype or 'off'}; train {len(self.train_ds)} / val {len(self.val_ds)} images")
        if self.dist.is_main:
            if self.resume_path is None:
                save_config(cfg, self.run_dir / "config.yaml")
            with open(self.run_dir / "command.txt", "a", encoding="utf-8") as handle:  # each start or resume
                handle.write(" ".join(shlex.quote(a) for a in ["python", *sys.argv]) + "\n")
        epoch_seconds: list[float] = []
        stop_reason = "finished the configured epochs"
        try:
            while self.epoch < self.planned_epochs:
                epoch = self.epoch + 1
                epoch_start = time.time()
                self._set_freezing(epoch)
                # Shuffling and augmentation depend only on (seed, epoch): a resumed run sees the same data order.
                epoch_seed = cfg.experiment.seed * 1000 + epoch
                self.generator.manual_seed(epoch_seed)
                if self.train_sampler is not None:
                    self.train_sampler.set_epoch(epoch)
                if cfg.data.num_workers == 0:
                    reseed_augmentations(self.train_ds, epoch_seed + self.dist.rank)
                ctx = self._context()
                result = train_one_epoch(self.train_model, self.train_loader, ctx, epoch, time_left=self._time_left)
                self.global_step = ctx.global_step
                eval_model = self.ema.module if self.ema is not None else self.model
                broadcast_buffers(eval_model)
                val = evaluate(eval_model, self.val_loader, self._metrics(), self.device, self.loss_fn,
                               self.amp_dtype, channels_last=cfg.train.channels_last,
                               show_progress=self.show_progress, desc=f"epoch {epoch} val",
                               distributed=self.dist.enabled)
                self.epoch = epoch
                stop = self._end_epoch(epoch, result, val, time.time() - epoch_start)
                epoch_seconds.append(time.time() - epoch_start)
                self._plan_epochs(epoch_seconds)
                if self._time_left() <= 0 or (self.epoch < self.planned_epochs and
                                              self._time_left() < 0.5 * epoch_seconds[-1]):
                    stop, stop_reason = True, f"time budget of {cfg.train.time_budget_min} min spent"
                elif stop:
                    stop_reason = f"early stopping: no {cfg.train.monitor} improvement for " \
                                  f"{cfg.train.early_stop_patience} epochs"
                if broadcast_flag(stop, self.device):
                    break
        except NonFiniteLossError as exc:
            self.log.error(f"stopped: {exc}")
            self._close()
            raise
        self.log.info(f"training ended after {self.epoch} epochs ({stop_reason}); best {cfg.train.monitor} "
                      f"{self.best_metric:.4f} at epoch {self.best_epoch}; {self.elapsed() / 60:.1f} min")
        self._write_hparams()
        self._close()
        return self.run_dir

    def _context(self) -> TrainContext:
        cfg = self.cfg
        return TrainContext(
            loss_fn=self.loss_fn, optimizer=self.optimizer, schedule=self.schedule, device=self.device,
            amp_dtype=self.amp_dtype, scaler=self.scaler, grad_clip=cfg.train.grad_clip,
            grad_accum_steps=cfg.train.grad_accum_steps, channels_last=cfg.train.channels_last, ema=self.ema,
            log_every=cfg.train.log_every_steps, show_progress=self.show_progress,
            on_log=self._log_scalars if self.writer is not None else None,
            global_step=getattr(self, "global_step", self.schedule.step_count))

    def _log_scalars(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def _end_epoch(self, epoch: int, result: EpochResult, val: dict, seconds: float) -> bool:
        """Record the epoch, write checkpoints and logs; returns True when early stopping says stop."""
        cfg = self.cfg
        monitor = val[cfg.train.monitor] if cfg.train.monitor in val else val.get("combined")
        improved = self._improved(monitor)
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = monitor, epoch, 0
        else:
            self.bad_epochs += 1
        self.schedule.step_epoch(epoch, monitor)
        row = {"epoch": epoch, "lr": self.schedule.lr, "time_s": round(seconds, 2),
               "train_img_s": round(result.images_per_second, 1),
               "loader_wait_s": round(result.data_seconds, 2), "train/accuracy": result.accuracy}
        row.update({f"train/{k}": v for k, v in result.terms.items()})
        row.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
        self.history.append(row)
        if self.dist.is_main:
            write_history(self.history, self.run_dir)
            ckpt = self._checkpoint()
            atomic_save(ckpt, self.run_dir / "last.pth")
            if improved:
                atomic_save(ckpt, self.run_dir / "best.pth")
                write_json_atomic({k: v for k, v in val.items()} | {"epoch": epoch}, self.run_dir / "best_val.json")
            self._log_epoch(epoch, result, val, improved, seconds)
        barrier()
        patience = cfg.train.early_stop_patience
        return patience > 0 and self.bad_epochs >= patience

    def _log_epoch(self, epoch: int, result: EpochResult, val: dict, improved: bool, seconds: float) -> None:
        terms = result.terms
        seg = f" dice {val['dice']:.4f} iou {val['iou']:.4f}" if "dice" in val else ""  # absent: classification only
        self.log.info(
            f"epoch {epoch:3d}/{self.planned_epochs} | loss {terms.get('total', float('nan')):.4f} "
            f"acc {result.accuracy:.3f} | val loss {val.get('loss', float('nan')):.4f} acc {val['accuracy']:.4f} "
            f"f1 {val['f1_macro']:.4f}{seg} | "
            f"{result.images_per_second:.0f} img/s (loader wait {result.data_seconds:.1f}s) {seconds:.0f}s"
            f"{' *' if improved else ''}")
        w = self.writer
        for name, value in terms.items():
            w.add_scalar(f"train/{name}", value, epoch)
        w.add_scalar("train/accuracy", result.accuracy, epoch)
        w.add_scalar("train/images_per_second", result.images_per_second, epoch)
        w.add_scalar("lr", self.schedule.lr, epoch)
        for name, value in val.items():
            if isinstance(value, (int, float)):
                w.add_scalar(f"val/{name}", value, epoch)
        every = self.cfg.train.image_log_every
        if every > 0 and (epoch % every == 0 or epoch == 1):
            self._log_figures(epoch, val)
        w.flush()

    def _log_figures(self, epoch: int, val: dict) -> None:
        from visualization.tensorboard import log_confusion_matrix, log_overlays

        eval_model = self.ema.module if self.ema is not None else self.model
        log_confusion_matrix(self.writer, val["confusion_matrix"], CLASS_NAMES, epoch)
        if "dice" in val:  # mask overlays only for a model with a segmentation output
            log_overlays(self.writer, eval_model, self.val_ds, self.device, self.cfg, epoch)

    def _write_hparams(self) -> None:
        if self.writer is None:
            return
        flat = {}
        for section, values in config_to_dict(self.cfg).items():
            for key, value in values.items():
                if isinstance(value, (int, float, str, bool)):
                    flat[f"{section}.{key}"] = value
        best = {f"hparam/{k}": float(v) for k, v in (self.history[self.best_epoch - 1] if self.best_epoch else {}
                                                      ).items() if k.startswith("val/") and isinstance(v, float)}
        if best:
            self.writer.add_hparams(flat, {k.replace("val/", ""): v for k, v in best.items()}, run_name="hparams")

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        cleanup_distributed()


def train(cfg: Config, resume: Optional[Path] = None, show_progress: bool = True) -> Path:
    """Train from a config (or resume a run) and return the run directory."""
    return Trainer(cfg, resume, show_progress).fit()
