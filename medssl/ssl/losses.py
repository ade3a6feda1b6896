"""SSL losses. One function per loss; each checked against a hand-written reference in tests/test_losses.py."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (gradients flow back to every rank's own rows) and this rank's row offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather  # differentiable, unlike dist.all_gather
    return torch.cat(all_gather(z), dim=0), dist.get_rank() * z.shape[0]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N anchors, as cross-entropy on cosine-similarity logits (log-sum-exp is stable).

    z1, z2: (N, d) projections of two views; row i of z1 and of z2 are positives, every other row of both
    views (of all ranks, when torch.distributed is initialised and gather=True) is a negative.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    if gather:
        keys1, offset = _gather_with_grad(z1)
        keys2, _ = _gather_with_grad(z2)
    else:
        keys1, keys2, offset = z1, z2, 0
    total = keys1.shape[0]  # N * world_size
    queries = torch.cat([z1, z2])  # (2N, d)
    logits = queries @ torch.cat([keys1, keys2]).T / temperature  # (2N, 2·total)
    rows = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([rows, rows + total])  # where each query sits among the keys
    pos_idx = torch.cat([rows + total, rows])  # its other view
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     norm_pix_loss: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """MAE loss: mean squared error per patch, averaged over masked patches only.

    pred, target: (B, L, P) patch vectors; mask: (B, L) with 1 = masked (predicted), 0 = visible.
    norm_pix_loss standardises each target patch by its own mean and (population) variance, as in MAE.
    """
    target = target.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)
