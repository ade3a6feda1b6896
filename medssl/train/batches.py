"""The stream of micro-batches the loop consumes: epochs, resume position, data-wait time, device moves."""
from __future__ import annotations

import time
from typing import Callable

import torch

from medssl.errors import TrainingError


class BatchStream:
    """Endless micro-batches from `loader_factory(epoch, position)`, one epoch after another.

    `epoch` and `position` (micro-batches already consumed in that epoch) are what a checkpoint stores; a
    resumed stream asks the factory for exactly that point.
    """

    def __init__(self, loader_factory: Callable, epoch: int = 0, position: int = 0):
        self.factory, self.epoch, self.position = loader_factory, int(epoch), int(position)
        self._it = None

    def next(self):
        """(batch, seconds spent waiting for it)."""
        start = time.perf_counter()
        while True:
            if self._it is None:
                self._it = _quiet_iter(self.factory(self.epoch, self.position))
            try:
                batch = next(self._it)
                break
            except StopIteration:
                if self.position == 0:
                    raise TrainingError(f"the data loader gave no batch for epoch {self.epoch}",
                                        where="pretrain training images",
                                        fix="add images or lower train.batch_size") from None
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
        self.position += 1
        return batch, time.perf_counter() - start


def _quiet_iter(loader):
    """iter(loader) without touching the global torch RNG: a DataLoader with no generator draws its worker
    seed from it, and a resumed run creates its iterator at another point of the random stream than the
    uninterrupted run did; the views made from that stream must not differ."""
    state = torch.get_rng_state()
    try:
        return iter(loader)
    finally:
        torch.set_rng_state(state)


def move_to_device(batch, device: torch.device, channels_last: bool = False):
    """Tensors (in dicts/lists/tuples) to the device; 4-D float images channels-last for 2-D convolutions."""
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, channels_last) for v in batch)
    return batch


def batch_samples(batch) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for value in values:
        n = batch_samples(value)
        if n:
            return n
    return 0
