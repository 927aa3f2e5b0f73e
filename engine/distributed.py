"""torch.distributed set-up for `torchrun` (NCCL on CUDA, gloo on CPU); a no-op for a plain `python train.py`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment variables, if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return info


def cleanup_distributed(wait_for_others: bool = True) -> None:
    """Leave the process group (after a barrier, unless the run was interrupted and other ranks may be gone)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's value (a decision, a number of epochs, ...) for every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([int(value)], device=device, dtype=torch.long)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision (stop training, ...) for every rank."""
    return bool(broadcast_int(1 if flag else 0, device))


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) so all ranks evaluate the saved model."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


class ShardSampler(Sampler[int]):
    """Evaluation sampler that gives rank r the indices r, r + W, r + 2W, ...

    Unlike `DistributedSampler` it never pads with repeated samples, so counts summed over ranks equal a
    single-process evaluation exactly.
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
