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


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """VICReg's three terms (Bardes et al. 2022) on expanded embeddings z1, z2 (N, d) of two views.

    invariance: mean squared distance of the paired rows; variance: hinge keeping each dimension's standard
    deviation (over the batch) at 1 or above, averaged over the two views; covariance: squared off-diagonal
    covariances / d, summed over the two views. No negatives: local batch statistics only.
    """
    z1, z2 = z1.float(), z2.float()
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    variance, covariance = z1.new_zeros(()), z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        variance = variance + F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean() / 2
        cov = z.T @ z / (n - 1)  # (d, d)
        off_diagonal = cov - torch.diag(torch.diag(cov))
        covariance = covariance + off_diagonal.pow(2).sum() / d
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def dino_cross_entropy(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                       student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """DINO's loss: cross-entropy of the student's distribution against the centred, sharpened teacher's, for
    every pair of different views, averaged over pairs and samples.

    student, teacher: one (N, K) logit tensor per view (the same views, in the same order); center (1, K).
    The teacher side carries no gradient.
    """
    targets = [F.softmax((t.float() - center) / teacher_temperature, dim=-1).detach() for t in teacher]
    total, pairs = student[0].new_zeros((), dtype=torch.float32), 0
    for i, target in enumerate(targets):
        for j, logits in enumerate(student):
            if i == j:  # a view is never its own target
                continue
            log_p = F.log_softmax(logits.float() / student_temperature, dim=-1)
            total, pairs = total - (target * log_p).sum(dim=-1).mean(), pairs + 1
    return total / pairs
