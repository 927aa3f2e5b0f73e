"""The training run behind `train.py`: build everything from a config, train, validate, checkpoint, resume.

Works the same with one process (`python train.py`) and under `torchrun` (DistributedDataParallel; rank 0 logs,
shows progress and writes files; validation counts are summed over ranks).

The epoch loop reads top to bottom in `Trainer.fit`; its helpers are one hop away (`engine.loops`,
`engine.loaders`, `engine.budget`, `engine.resume`, `engine.logs`). The file is a little over 400 lines
because set-up, checkpoint contents and the loop share the trainer's state and read best side by side.
"""
from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import yaml

from datasets import CLASS_NAMES
from datasets.factory import build_train_val
from losses import MultiTaskLoss
from model import build_model
from model.freeze import set_encoder_frozen
from model.loading import assign_tasks, load_weights, model_kwargs
from utils.checkpoint import atomic_save, capture_rng_state, checkpoint_bytes, read_checkpoint, restore_rng_state, unwrap_model
from utils.config import Config, config_to_dict, monitor_mode
from utils.disk import DiskFullError, ensure_free_space
from utils.lock import RunLock
from engine.distributed import (barrier, broadcast_buffers, broadcast_flag, broadcast_int, cleanup_distributed,
                                init_distributed)
from engine.budget import STOP_KINDS, epochs_that_fit, stop_code, stop_message
from engine.ema import build_ema
from engine.loaders import build_loaders, seed_epoch
from engine.logs import epoch_line, summary_line, write_epoch_scalars, write_hparams
from engine.loops import EpochResult, NonFiniteLossError, TrainContext, train_one_epoch
from engine.resume import ResumePlan, plan_resume
from evaluation.inference import evaluate
from evaluation.metrics import MultiTaskMetrics
from engine.optim import LRSchedule, build_optimizer
from utils.runs import (new_run_dir, point_latest, read_history, setup_logger, write_history, write_json_atomic,
                        write_text_atomic)
from utils.runtime import amp_dtype as select_amp_dtype
from utils.runtime import eval_dtype, seed_everything, select_device

class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) during training; the message says where it stopped and how to resume."""


class Trainer:
    def __init__(self, cfg: Config, resume: Union[None, Path, ResumePlan] = None, show_progress: bool = True,
                 config_file: Optional[str] = None) -> None:
        self.start_time = time.time()
        # A bare checkpoint path resumes with the run's own config; train.py passes a plan with accepted changes.
        self.plan = plan_resume(Path(resume)) if resume is not None and not isinstance(resume, ResumePlan) else resume
        self.cfg = cfg = self.plan.cfg if self.plan is not None else cfg
        self.resume_path = self.plan.checkpoint if self.plan is not None else None
        self.config_file = str(Path(config_file).resolve()) if config_file else None
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.device = select_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = init_distributed(self.device.type)
        self.show_progress = show_progress and self.dist.is_main
        self.created_run_dir = self.plan is None or self.plan.new_run
        self.run_dir = self._make_run_dir()
        self.writer = None
        # One process per run directory (a second `--resume auto`, test.py writing into it): see utils/lock.py
        self.lock = RunLock(self.run_dir, "training") if self.dist.is_main else None
        try:
            if self.lock is not None:
                self.lock.acquire()
            self._build()
        except BaseException:
            self._discard_failed_start()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        self.log = setup_logger(self.run_dir if self.dist.is_main else None, self.dist.is_main)
        seed_everything(cfg.experiment.seed + self.dist.rank, cfg.experiment.deterministic)
        resume_ckpt = read_checkpoint(self.resume_path) if self.resume_path is not None else None

        # Data: rank 0 draws (or reads) the split first so the other ranks read the same file.
        split_path = self.run_dir / "split.json"
        old_split = self.resume_path.parent / "split.json" if self.resume_path is not None else None
        if self.dist.is_main and old_split is not None and old_split.is_file() and not split_path.is_file():
            shutil.copy2(old_split, split_path)  # a new run from another run's checkpoint keeps its split
        if self.dist.is_main:
            self.train_ds, self.val_ds = build_train_val(cfg.data, split_path, verbose=True)
        barrier()
        if not self.dist.is_main:
            self.train_ds, self.val_ds = build_train_val(cfg.data, split_path, verbose=False)
        self.train_loader, self.val_loader, self.train_sampler, self.generator = build_loaders(
            cfg, self.train_ds, self.val_ds, self.dist, self.device)

        # Model, loss, optimisation. Pretrained encoder weights are not read when a checkpoint overwrites them.
        self.model = build_model(cfg.model.name, **model_kwargs(cfg, pretrained=resume_ckpt is None)).to(self.device)
        self.tasks = assign_tasks(self.model, cfg)  # a single-task run evaluates the trained head alone
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.class_counts = self._class_counts()
        self.loss_fn = MultiTaskLoss(cfg.loss, class_counts=self.class_counts).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.grad_accum_steps)
        self.monitor_mode = monitor_mode(cfg.train)
        self.schedule = LRSchedule(self.optimizer, cfg.sched, steps_per_epoch, cfg.train.epochs, self.monitor_mode)
        self.amp_dtype = select_amp_dtype(cfg.train, self.device)
        self.eval_dtype = eval_dtype(cfg.eval, self.device)  # the same precision as test.py
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ema = build_ema(self.model, cfg.train.ema_decay) if cfg.train.ema else None

        self.epoch = 0  # completed epochs
        self.saved_epoch = 0  # the epoch last.pth holds
        self.best_metric: Optional[float] = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.planned_epochs = cfg.train.epochs
        self.stopped: Optional[str] = None  # a STOP_KINDS value once training has ended
        self.elapsed_before = 0.0  # training seconds spent before a resume
        self._encoder_frozen = False
        self._ctx: Optional[TrainContext] = None
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
    def _make_run_dir(self) -> Path:
        if not self.created_run_dir:
            return self.resume_path.parent
        run_dir = None
        if self.dist.is_main:
            run_dir = new_run_dir(self.cfg.experiment.work_dir, self.cfg.experiment.name)
        if self.dist.enabled:  # every rank writes into rank 0's directory
            holder = [str(run_dir) if run_dir else None]
            torch.distributed.broadcast_object_list(holder, src=0)
            run_dir = Path(holder[0])
        return run_dir

    def _discard_failed_start(self) -> None:
        """A start that fails before training leaves no run directory behind (and `latest` was never moved)."""
        log = getattr(self, "log", None)
        for handler in list(log.handlers) if log is not None else []:
            handler.close()
            log.removeHandler(handler)
        if self.writer is not None:
            self.writer.close()
        if self.created_run_dir and self.dist.is_main:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()

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
            self.ema.n_averaged = int(ckpt.get("ema_updates", 1))
        self.epoch = self.saved_epoch = ckpt["epoch"]
        self.best_metric, self.best_epoch = ckpt.get("best_metric"), ckpt.get("best_epoch", 0)
        self.bad_epochs = ckpt.get("bad_epochs", 0)
        self.planned_epochs = ckpt.get("planned_epochs", self.cfg.train.epochs)
        self.elapsed_before = ckpt.get("elapsed_s", 0.0)
        self.config_file = ckpt.get("config_file") or self.config_file  # changes are judged against the first one
        self.history = read_history(self.resume_path.parent)[: self.epoch]
        if ckpt.get("rng") and self.dist.rank == 0:
            restore_rng_state(ckpt["rng"])
        where = " into a new run directory" if self.plan.new_run else ""
        self.log.info(f"resumed from {self.resume_path} after epoch {self.epoch}{where}")
        for key, (old, new) in self.plan.changes.items():
            self.log.info(f"resume: {key} changed from {old!r} to {new!r}")
        if {"train.epochs", "train.time_budget_min"} & set(self.plan.changes):
            # More epochs or another budget: plan the schedule again from the configured length.
            self.planned_epochs = self.cfg.train.epochs
            self.schedule.set_total_epochs(self.planned_epochs)
            self._plan_epochs([row["time_s"] for row in self.history if "time_s" in row])

    # ------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> dict:
        return {
            "format_version": 1,
            "model_name": self.cfg.model.name,
            "config": config_to_dict(self.cfg),
            "config_file": self.config_file,
            "model": unwrap_model(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.n_averaged if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "planned_epochs": self.planned_epochs,
            "stopped": self.stopped,  # why training ended after this epoch (None: it went on or was cut)
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

    def _budget_spent_check(self) -> Optional[Callable[[], bool]]:
        """For the step loop: is the budget spent? Rank 0's clock decides for every rank (None: no budget)."""
        if self.cfg.train.time_budget_min <= 0:
            return None
        return lambda: broadcast_flag(self._time_left() <= 0, self.device)

    def _plan_epochs(self, epoch_seconds: list[float]) -> None:
        """With a time budget, shorten the schedule to the epochs that still fit (re-estimated every epoch).

        Rank 0 plans and broadcasts: ranks with their own clocks could plan different cosine lengths."""
        if self.cfg.train.time_budget_min <= 0 or not epoch_seconds:
            return
        planned = broadcast_int(epochs_that_fit(self.cfg.train, self.epoch, self._time_left(), epoch_seconds),
                                self.device)
        if planned != self.planned_epochs:
            self.planned_epochs = planned
            self.schedule.set_total_epochs(planned)
            self.log.info(f"time budget: {self._time_left() / 60:.1f} min left -> training for {planned} epochs")

    def _stop_decision(self, epoch_seconds: list[float]) -> Optional[str]:
        """Whether training ends after this epoch and why (a STOP_KINDS value); rank 0 decides for every rank."""
        code = stop_code(self.cfg.train, self.epoch, self.planned_epochs, self.bad_epochs, self._time_left(),
                         epoch_seconds[-1])
        return STOP_KINDS.get(broadcast_int(code, self.device))

    def _metrics(self) -> MultiTaskMetrics:
        return MultiTaskMetrics(self.cfg.model.num_classes, CLASS_NAMES, threshold=self.cfg.eval.threshold)

    def _improved(self, value: float) -> bool:
        if self.best_metric is None or not math.isfinite(self.best_metric):
            return math.isfinite(value)
        return value > self.best_metric if self.monitor_mode == "max" else value < self.best_metric

    def fit(self) -> Path:
        """Train to the end (or a stop); the run's lock is released however it ends."""
        try:
            return self._fit()
        except DiskFullError as exc:
            last = self.run_dir / "last.pth"
            if not last.is_file():
                raise
            raise DiskFullError(f"{getattr(exc, 'shortage', exc)}; training stopped at epoch {self.epoch}: free some "
                                f"space, then continue from the last good checkpoint (epoch {self.saved_epoch}) with: "
                                f"python train.py --config {self.run_dir / 'config.yaml'} --resume {last}") from exc
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> Path:
        cfg = self.cfg
        if self.dist.is_main:
            if self.created_run_dir:
                point_latest(self.run_dir)  # only now: the run has really started
            # with the changes a resume applied; atomically: a full disk must not leave a truncated config.yaml
            write_text_atomic(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), self.run_dir / "config.yaml",
                              "config")
            with open(self.run_dir / "command.txt", "a", encoding="utf-8") as handle:  # each start or resume
                handle.write(" ".join(shlex.quote(a) for a in ["python", *sys.argv]) + "\n")
        self.log.info(f"run directory: {self.run_dir}")
        self.log.info(f"model {cfg.model.name}: {self.num_params:,} parameters; device {self.device}"
                      f"{f' x{self.dist.world_size} processes' if self.dist.enabled else ''}; "
                      f"amp {self.amp_dtype or 'off'}; validation {cfg.eval.precision}; "
                      f"train {len(self.train_ds)} / val {len(self.val_ds)} images; monitor {cfg.train.monitor} "
                      f"({self.monitor_mode})")
        epoch_seconds: list[float] = []
        try:
            while self.epoch < self.planned_epochs:
                epoch = self.epoch + 1
                epoch_start = time.time()
                self._set_freezing(epoch)
                seed_epoch(self.train_loader, self.train_sampler, self.generator, cfg.experiment.seed, epoch,
                           self.dist.rank)
                self._ctx = ctx = self._context()
                result = train_one_epoch(self.train_model, self.train_loader, ctx, epoch,
                                         should_stop=self._budget_spent_check())
                self.global_step = ctx.global_step
                eval_model = self.ema.module if self.ema is not None else self.model
                broadcast_buffers(eval_model)
                val = evaluate(eval_model, self.val_loader, self._metrics(), self.device, self.loss_fn,
                               self.eval_dtype, channels_last=cfg.train.channels_last,
                               show_progress=self.show_progress, desc=f"epoch {epoch} val",
                               distributed=self.dist.enabled)
                self.epoch = epoch
                improved = self._record(epoch, result, val, time.time() - epoch_start)
                epoch_seconds.append(time.time() - epoch_start)
                self._plan_epochs(epoch_seconds)
                self.stopped = self._stop_decision(epoch_seconds)
                self._save(epoch, result, val, improved, epoch_seconds[-1])
                if self.stopped:
                    break
        except NonFiniteLossError as exc:
            self.log.error(f"stopped: {exc}")
            self._close()
            raise
        except KeyboardInterrupt:
            raise self._interrupted() from None
        self.log.info(summary_line(self.epoch, stop_message(self.stopped, cfg.train), cfg.train.monitor, self.best_metric,
                                   self.best_epoch, self.elapsed() / 60))
        self._write_hparams()
        self._close()
        return self.run_dir

    def _interrupted(self) -> TrainingInterrupted:
        """Ctrl-C: the step in progress is abandoned; last.pth (written atomically) holds the last whole epoch."""
        step = self._ctx.step if self._ctx is not None else 0
        where = f"interrupted at epoch {self.epoch + 1} step {step}"
        last = self.run_dir / "last.pth"
        if last.is_file():
            message = f"{where}; resume with: python train.py --config {self.run_dir / 'config.yaml'} --resume {last}"
        else:
            message = f"{where}, before the first checkpoint; nothing to resume (train again to start over)"
        self.log.info(message)
        self._close(interrupted=True)
        return TrainingInterrupted(message)

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

    def _record(self, epoch: int, result: EpochResult, val: dict, seconds: float) -> bool:
        """Track the monitored metric (best, early stopping, plateau schedule) and the history; True if improved."""
        monitor = val[self.cfg.train.monitor]  # the config schema only accepts metrics that evaluate() returns
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
        return improved

    def _save(self, epoch: int, result: EpochResult, val: dict, improved: bool, seconds: float) -> None:
        """History, last.pth (and best.pth, best_val.json when improved), the epoch's log line and figures."""
        if self.dist.is_main:
            ckpt = self._checkpoint()
            # Room for the whole epoch first (nothing of it is written otherwise); last.pth goes last, so that
            # whatever fails on the way, `--resume` continues from a consistent previous epoch.
            ensure_free_space(self.run_dir / "last.pth", checkpoint_bytes(ckpt) * (2 if improved else 1),
                              "checkpoint")
            write_history(self.history, self.run_dir)
            if improved:
                atomic_save(ckpt, self.run_dir / "best.pth")
                write_json_atomic({k: v for k, v in val.items()} | {"epoch": epoch}, self.run_dir / "best_val.json")
            atomic_save(ckpt, self.run_dir / "last.pth")
            self.saved_epoch = epoch
            self._log_epoch(epoch, result, val, improved, seconds)
        barrier()

    def _log_epoch(self, epoch: int, result: EpochResult, val: dict, improved: bool, seconds: float) -> None:
        self.log.info(epoch_line(epoch, self.planned_epochs, result, val, improved, seconds))
        write_epoch_scalars(self.writer, epoch, result, val, self.schedule.lr)
        every = self.cfg.train.image_log_every
        if every > 0 and (epoch % every == 0 or epoch == 1):
            self._log_figures(epoch, val)
        self.writer.flush()

    def _log_figures(self, epoch: int, val: dict) -> None:
        from visualization.tensorboard import log_confusion_matrix, log_overlays

        eval_model = self.ema.module if self.ema is not None else self.model
        if "confusion_matrix" in val:  # absent in a segmentation-only run
            log_confusion_matrix(self.writer, val["confusion_matrix"], CLASS_NAMES, epoch)
        if "dice" in val:  # mask overlays only for a model with a segmentation output
            log_overlays(self.writer, eval_model, self.val_ds, self.device, self.cfg, epoch)

    def _write_hparams(self) -> None:
        if self.writer is not None and self.best_epoch:
            write_hparams(self.writer, self.cfg, self.history[self.best_epoch - 1])

    def _close(self, interrupted: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        cleanup_distributed(wait_for_others=not interrupted)


def train(cfg: Config, resume: Union[None, Path, ResumePlan] = None, show_progress: bool = True,
          config_file: Optional[str] = None) -> Path:
    """Train from a config (or resume a run: a checkpoint path or a `ResumePlan`) and return the run directory.

    `config_file`: the YAML file `cfg` came from, recorded so that a resume can tell a different file apart."""
    return Trainer(cfg, resume, show_progress, config_file).fit()
