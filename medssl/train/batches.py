"""What the loop does to a micro-batch before the method sees it: move it to the device, count its samples."""
from __future__ import annotations

import torch


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


def add_scalars(sums: dict, out: dict) -> None:
    """Detached sums of the scalar outputs (loss + diagnostics), kept on the device: no sync per micro-batch."""
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.detach().float().reshape(())
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        sums[key] = sums[key] + value if key in sums else value
