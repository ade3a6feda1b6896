"""Optional data-parallel training (DDP), and the deterministic, resumable, sharded data order.

Nothing here is needed for a single process: without torchrun's environment every helper answers
"rank 0 of 1" and no process group is created. Launch several processes, on one node or several, with
the same command:

    torchrun --nproc_per_node=4 [--nnodes=2 --node_rank=0 --master_addr=HOST] -m medssl.cli pretrain ...

Only rank 0 logs and writes files; every rank reads the checkpoint folder to resume, so on several nodes it
must be on a shared file system.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medssl.errors import TrainingError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
    nccl when CUDA is available, gloo otherwise. Without those variables: a single process, no group."""
    if dist.is_available() and dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed",
                            fix="install a PyTorch build with distributed support, or run one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        # before init: NCCL binds each process to its own GPU
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return current()


def current() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def cleanup() -> None:
    global _coordination
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _coordination = None


# rank 0 alone may build the cache of a large cohort or score a report for hours while the other ranks wait,
# far beyond a process group's default timeout (gloo 30 min, nccl 10 min). A rank that dies still ends the
# wait: its peers' connections close, and torchrun stops every rank when one fails.
COORDINATION_TIMEOUT = timedelta(hours=24)
_coordination = None


def coordination_group():
    """The gloo group the ranks of a torchrun pipeline wait on and pass small Python objects over (gloo:
    no GPU needed, whatever backend training uses); None in a single process. Every rank must make its first
    call at the same point (new_group is collective)."""
    global _coordination
    if not init_distributed().enabled:
        return None
    if _coordination is None:
        _coordination = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
    return _coordination


def wait_for_all() -> None:
    """Every rank gets here before any goes on (no timeout short of COORDINATION_TIMEOUT)."""
    group = coordination_group()
    if group is not None:
        dist.barrier(group=group)


def from_rank0(obj):
    """Rank 0's `obj` on every rank (a rank > 0's own `obj` is ignored); `obj` itself in a single process.
    Small, plain values only (stage outputs, run ids): torch pickles them between the job's own ranks."""
    group = coordination_group()
    if group is None:
        return obj
    box = [obj if current().rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def wrap_model(model: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DDP around the method when several processes train; the method itself otherwise.

    find_unused=False: every trainable parameter of medssl's methods gets a gradient every step (MONAI's
    unused `norm_cross_attn` is frozen, models/vit.py), so DDP skips the per-step search of the autograd graph
    for unused ones. A custom method with parameters it does not always use passes find_unused=True."""
    if not current().enabled:
        return model
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def gather_objects(obj) -> list:
    """Every rank's `obj` (e.g. its RNG state), in rank order; [obj] in a single process."""
    info = current()
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_mean(value: float, device: torch.device) -> float:
    """Mean of a scalar over ranks (the loss every rank agrees on for the NaN check and the log)."""
    if not current().enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / current().world_size


# ---------------------------------------------------------------------------------------- data order
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The same permutation of range(n) on every rank and in every resumed process."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for one epoch, for one rank, starting at batch `start`.

    Global batch j of an epoch is order[j*W*B : (j+1)*W*B]; rank r takes its r-th slice of B, so ranks see
    disjoint samples and every rank has the same number of batches (the tail that does not fill a global
    batch is dropped; DDP would hang if ranks had different step counts). Skipping `start` batches only
    skips indices: no sample before the resume point is read.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world_size, self.shuffle = start, rank, world_size, shuffle

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        global_batch = self.batch_size * self.world_size
        for j in range(self.start, self.batches_per_epoch()):
            lo = j * global_batch + self.rank * self.batch_size
            yield order[lo: lo + self.batch_size].tolist()


def sharded_loader(dataset, batch_size: int, seed: int, workers: int = 0, shuffle: bool = True):
    """A `loader_factory(epoch, position)` for `loop.train` over a map-style dataset, sharded over ranks."""
    info = current()
    if len(dataset) < batch_size * info.world_size:
        raise TrainingError(f"{len(dataset)} training samples cannot fill one batch of {batch_size} on each of "
                            f"{info.world_size} processes", where="pretrain.train.batch_size",
                            fix="lower train.batch_size or add images")

    def factory(epoch: int, position: int):
        if hasattr(dataset, "set_epoch"):  # CropDataset: new crop positions every epoch, same on resume
            dataset.set_epoch(epoch)
        sampler = ResumableBatchSampler(len(dataset), batch_size, seed, epoch, position, info.rank,
                                        info.world_size, shuffle)
        # an explicit generator keeps DataLoader from drawing its worker seed from the global RNG
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, generator=gen,
                                           pin_memory=torch.cuda.is_available(),
                                           persistent_workers=False)
    return factory
