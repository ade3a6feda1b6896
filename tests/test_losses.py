"""NT-Xent and masked-patch MSE against hand-written references; patchify round trips (2D and 3D)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from medssl.ssl.losses import masked_patch_mse, nt_xent
from medssl.models.patchify import patchify, random_masking, unpatchify


def reference_nt_xent(z1, z2, t):
    """The SimCLR formula with explicit loops: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert float(nt_xent(z1, z2, t)) == pytest.approx(reference_nt_xent(z1, z2, t), rel=1e-5)


def test_nt_xent_limits():
    n = 4
    same = torch.ones(n, 6)  # every pair equally similar: uniform over the 2N-1 candidates
    assert float(nt_xent(same, same, 0.1)) == pytest.approx(math.log(2 * n - 1), rel=1e-5)
    basis = torch.eye(n, 6)  # positives identical, negatives orthogonal, low temperature
    assert float(nt_xent(basis, basis.clone(), 0.01)) < 1e-6


def test_nt_xent_is_stable_at_tiny_temperature():
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    assert torch.isfinite(nt_xent(z1, z2, 1e-4))  # exp/sum forms overflow here


def _worker(rank, world, port, z1, z2, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = z1.shape[0] // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(a, b, 0.2)
    loss.backward()
    out[rank] = (float(loss), a.grad.clone(), b.grad.clone())
    dist.destroy_process_group()


def test_nt_xent_gathers_negatives_across_ranks_with_gradients():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = nt_xent(a, b, 0.2)
    full.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, z1, z2, out), nprocs=2)
    # mean of the ranks' losses = the single-process loss over all 2·4 anchors
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(float(full.detach()), rel=1e-5)
    # all_gather's backward sums every rank's gradient into the owner's rows: each rank holds the gradient
    # of (loss_0 + loss_1) = 2 · full loss; DDP's averaging over 2 ranks then gives the full-batch gradient.
    # Without gradients through the gather, other ranks' terms would be missing and this would fail.
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), 2 * a.grad, atol=1e-5)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]), 2 * b.grad, atol=1e-5)


def test_masked_mse_hand_computed():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]]])  # (B=1, L=3, P=2)
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [1.0, 3.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patch 1 is visible: ignored
    # patch 0: ((1)^2 + (2)^2)/2 = 2.5 ; patch 2: ((2)^2 + 0)/2 = 2.0 -> mean 2.25
    assert float(masked_patch_mse(pred, target, mask, norm_pix_loss=False)) == pytest.approx(2.25)
    # norm_pix: patch 0 target (0, 0) -> (0, 0); patch 2 target (1, 3): mean 2, var 1 -> (-1, 1)
    # patch 0: 2.5 ; patch 2: ((3+1)^2 + (3-1)^2)/2 = 10 -> mean 6.25
    got = masked_patch_mse(pred, target, mask, norm_pix_loss=True, eps=0.0 + 1e-12)
    assert float(got) == pytest.approx(6.25, rel=1e-5)


@pytest.mark.parametrize("shape,patch", [((2, 3, 8, 12), 4), ((2, 2, 8, 4, 12), 4), ((1, 1, 6, 6, 6), 3)])
def test_patchify_roundtrip(shape, patch):
    x = torch.randn(shape)
    grid = [s // patch for s in shape[2:]]
    tokens = patchify(x, patch)
    assert tokens.shape == (shape[0], math.prod(grid), patch ** len(grid) * shape[1])
    assert torch.equal(unpatchify(tokens, patch, grid, shape[1]), x)


def test_patchify_token_order_is_row_major_and_channels_last():
    x = torch.randn(1, 2, 8, 8, 8)
    tokens = patchify(x, 4)  # grid 2x2x2
    # token 1 = grid cell (0, 0, 1): the last axis varies fastest, as in conv patch embedding + flatten(2)
    cell = x[0, :, 0:4, 0:4, 4:8]  # (C, p, p, p)
    assert torch.equal(tokens[0, 1], cell.permute(1, 2, 3, 0).reshape(-1))


def test_random_masking_counts_and_restore():
    keep, mask, restore = random_masking(3, 16, 0.75, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert keep.shape == (3, 4) and mask.sum(1).tolist() == [12.0] * 3
    for b in range(3):  # kept tokens are exactly the unmasked ones
        assert sorted(keep[b].tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
    assert not torch.equal(keep[0], keep[1])  # per-sample masks
