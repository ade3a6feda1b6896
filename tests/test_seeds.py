"""Seeds that control what they claim: the SSL views and masks draw from their own stream (never the global
RNG), which a checkpoint carries; `train.deterministic` turns on PyTorch's deterministic algorithms and names
the op that cannot comply."""
from __future__ import annotations

import os

import pytest
import torch

from medssl.config import ContrastiveConfig, EncoderConfig, MaskedConfig, PretrainConfig, SSLConfig, ViewsConfig
from medssl.ssl import build_method
from test_ssl_methods import anatomy

VIT = EncoderConfig(name="vit", patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
MASKED = MaskedConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2, mask_ratio=0.5)
VIEWS = ViewsConfig(rotate_degrees=10, noise_std=0.05, blur_sigma=(0.0, 0.5), cutout_fraction=0.2)
SSL = {"simclr": SSLConfig(contrastive=ContrastiveConfig(projection_dim=8)), "mae": SSLConfig(masked=MASKED),
       "both": SSLConfig(masked=MASKED, contrastive=ContrastiveConfig(projection_dim=8))}


def method_for(ssl: str, spatial_dims: int, seed: int = 3):
    torch.manual_seed(0)   # the same initial weights; the views' randomness is the method's own
    cfg = PretrainConfig(encoder=VIT, ssl=SSL[ssl], views=VIEWS, crop=[16] * spatial_dims)
    cfg.train.seed = seed
    return build_method(cfg, spatial_dims).eval()   # eval: no dropout, only views and masks are random


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("ssl", sorted(SSL))
def test_views_and_masks_ignore_the_global_rng(ssl, spatial_dims):
    batch = {"image": anatomy(spatial_dims, batch=4)}
    a, b = method_for(ssl, spatial_dims), method_for(ssl, spatial_dims)
    with torch.no_grad():
        torch.manual_seed(11)
        loss_a = [float(a(batch)["loss"]) for _ in range(2)]
        torch.manual_seed(12345)                          # other global draws: the same views and masks
        torch.rand(1000)
        loss_b = [float(b(batch)["loss"]) for _ in range(2)]
        assert loss_a == loss_b and loss_a[0] != loss_a[1]   # the stream moves between calls
        other = method_for(ssl, spatial_dims, seed=4)
        assert float(other(batch)["loss"]) != loss_a[0]      # and the run seed chooses it


def test_the_stream_travels_in_the_state_dict_like_a_checkpoint(tmp_path):
    batch = {"image": anatomy(2, batch=4)}
    method = method_for("both", 2)
    with torch.no_grad():
        method(batch), method(batch)                             # two steps done before the "checkpoint"
        torch.save(method.state_dict(), tmp_path / "state.pt")
        expected = float(method(batch)["loss"])                  # what the uninterrupted run draws next
        resumed = method_for("both", 2)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        assert float(resumed(batch)["loss"]) == expected


# ------------------------------------------------------------------------------ deterministic algorithms
def test_deterministic_mode_names_the_op_that_cannot_comply():
    from medssl.errors import TrainingError
    from medssl.train.determinism import deterministic_algorithms
    before = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(TrainingError, match=r"the op put_ has no deterministic implementation") as err:
        with deterministic_algorithms(True):
            torch.zeros(5).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))   # refused on the CPU too
    assert "train.deterministic" in err.value.where and "false" in err.value.fix
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic_algorithms(False):
        torch.zeros(5).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))       # off: nothing changes


def test_train_deterministic_is_on_during_pretraining_only(tmp_path, monkeypatch):
    from medssl.config import TrainConfig
    from medssl.tracking.tracker import NullTracker
    from medssl.train.pretrain import run_pretraining
    from test_train_loop import _t1_cohort
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def probe(encoder, device):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return {}

    cache = _t1_cohort(4)
    cfg = PretrainConfig(encoder=VIT, ssl=SSL["mae"], views=VIEWS, crop=[16, 16],
                         train=TrainConfig(steps=2, batch_size=2, warmup_steps=0, probe_every=1, deterministic=True))
    run_pretraining(cfg, cache, list(cache.arrays), None, tmp_path, NullTracker(), probe=probe, spatial_dims=2,
                    device="cpu")
    assert seen and all(s == (True, ":4096:8") for s in seen)
    assert not torch.are_deterministic_algorithms_enabled()
