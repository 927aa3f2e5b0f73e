"""The training and validation DataLoaders of a run, and the per-epoch seeding of shuffling and augmentation."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from engine.distributed import DistInfo, ShardSampler
from utils.config import Config
from utils.runtime import reseed_augmentations, seed_worker

# Spreads the ranks' augmentation seeds far apart, so rank r in epoch e never reuses another rank's seed.
_RANK_STRIDE = 1_000_003


def build_loaders(cfg: Config, train_ds: Dataset, val_ds: Dataset, dist_info: DistInfo, device: torch.device
                  ) -> tuple[DataLoader, DataLoader, Optional[DistributedSampler], torch.Generator]:
    """Training loader (shuffled; a DistributedSampler under torchrun) and a non-padded sharded validation loader."""
    workers = cfg.data.loader.num_workers
    common = dict(num_workers=workers, pin_memory=cfg.data.loader.pin_memory and device.type == "cuda",
                  worker_init_fn=seed_worker if workers > 0 else None)
    # Persistent workers keep their RNG across epochs, which would make a resumed run diverge from an
    # uninterrupted one; deterministic runs re-create workers each epoch instead.
    persistent = workers > 0 and not cfg.experiment.deterministic
    generator = torch.Generator()
    sampler = None
    if dist_info.enabled:
        sampler = DistributedSampler(train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                     seed=cfg.experiment.seed, drop_last=True)
    train_loader = DataLoader(train_ds, batch_size=cfg.data.loader.batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_ds) > cfg.data.loader.batch_size, generator=generator,
                              persistent_workers=persistent, prefetch_factor=4 if workers > 0 else None, **common)
    val_sampler = ShardSampler(val_ds, dist_info.rank, dist_info.world_size) if dist_info.enabled else None
    val_loader = DataLoader(val_ds, batch_size=cfg.eval.batch_size, shuffle=False, sampler=val_sampler,
                            persistent_workers=persistent, **common)
    return train_loader, val_loader, sampler, generator


def seed_epoch(loader: DataLoader, sampler: Optional[DistributedSampler], generator: torch.Generator,
               seed: int, epoch: int, rank: int) -> None:
    """Seed shuffling and augmentation of `epoch` from (seed, epoch, rank) only: a resumed run sees the same data.

    Under DDP the sampler (same seed on every rank) shards the data; the loader generator, which seeds the
    workers' augmentation streams, includes the rank so that the ranks do not draw identical augmentations.
    """
    epoch_seed = seed * 1000 + epoch
    rank_seed = epoch_seed + _RANK_STRIDE * rank
    generator.manual_seed(rank_seed)
    if sampler is not None:
        sampler.set_epoch(epoch)
    if loader.num_workers == 0:
        reseed_augmentations(loader.dataset, rank_seed)
