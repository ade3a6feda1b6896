"""The SSL views' and masks' own random stream (each random op owns its generator, as MONAI's
`Randomizable.set_random_state`): nothing else moves it, and it moves nothing else.

Every call (one per forward of an SSL method) reseeds one torch.Generator on the batch's device from
(run seed, rank, call number): ranks draw different views, and the stream's whole state is the call number,
kept in the method's state dict (`get_extra_state`), so a checkpoint carries it and a resumed run draws the
same views as an uninterrupted one. Reseeding costs microseconds; a generator's raw state would differ
between CPU and CUDA and could not move between them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ViewStream(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed, self.calls = int(seed), 0
        self._generators: dict[str, torch.Generator] = {}

    def next(self, device: torch.device | str) -> torch.Generator:
        """The generator for one forward pass, seeded for this call; advances the call number."""
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        words = np.random.SeedSequence([self.seed % 2**63, _rank(), self.calls]).generate_state(2, np.uint32)
        self.calls += 1
        return self._generators[key].manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)

    def get_extra_state(self) -> torch.Tensor:
        # a tensor, like every other state-dict value (code that clones or compares state dicts keeps working)
        return torch.tensor([self.seed % 2**63, self.calls], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.seed, self.calls = (int(v) for v in state.tolist())
