"""SparK (medssl/ssl/spark.py, medssl/models/sparse.py), 2D and 3D, on crops of the ITK example T1: the loss is
the hand-written masked-patch MSE, masked pixels never reach the encoder, holes stay empty at every level, the
sparse BatchNorm is BatchNorm over the visible positions, and pretraining runs through medssl's loop."""
import copy
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.config import EncoderConfig, PretrainConfig, SparKConfig, SSLConfig, TrainConfig, ViewsConfig
from medssl.demo.cohort import ITK_T1
from medssl.errors import ConfigError
from medssl.models.patchify import random_masking
from medssl.models.sparse import MaskPyramid, sparse_batch_norm, sparse_resnet_features
from medssl.ssl import build_method, method_name

from test_ssl_methods import train_losses  # one optimisation helper for every method's smoke test

pytestmark = pytest.mark.skipif(not ITK_T1.is_file(), reason="ITK example T1 not installed")

ENCODER = EncoderConfig(name="resnet10", width=0.25)
SPARK = SparKConfig(patch_size=8, mask_ratio=0.6)
VIEWS = ViewsConfig(rotate_degrees=5, noise_std=0.01, blur_sigma=(0.0, 0.5))


def t1_crops(spatial_dims: int, batch: int = 4) -> torch.Tensor:
    """32^3 (or the central 32^2 slice of) crops of the ITK T1 (RAS: 128, 62, 128) inside the head, in [0, 1]."""
    vol = np.asarray(nib.as_closest_canonical(nib.load(ITK_T1)).dataobj, dtype=np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    crops = [vol[30 + 12 * i:62 + 12 * i, 15:47, 40 + 8 * i:72 + 8 * i] for i in range(batch)]
    x = torch.from_numpy(np.stack(crops))[:, None]  # (B, 1, 32, 32, 32)
    return x if spatial_dims == 3 else x[..., 16]


def spark(spatial_dims: int, **ssl):
    torch.manual_seed(0)
    cfg = PretrainConfig(encoder=ENCODER, ssl=SSLConfig(spark=SPARK.model_copy(update=ssl)), views=VIEWS,
                         crop=[32] * spatial_dims)
    return build_method(cfg, spatial_dims)


def fixed_mask(batch: int, spatial_dims: int, seed: int = 3) -> torch.Tensor:
    length = (32 // SPARK.patch_size) ** spatial_dims
    _, mask, _ = random_masking(batch, length, SPARK.mask_ratio, torch.device("cpu"),
                                torch.Generator().manual_seed(seed))
    return mask  # (B, L), 1 = masked


def reference_loss(pred: np.ndarray, x: np.ndarray, mask: np.ndarray, patch: int, eps: float = 1e-6) -> float:
    """By hand: for every masked patch (its grid position from the row-major patch index), standardise the
    target patch by its own mean and population variance, mean squared error over its values; then the mean
    over masked patches of all samples."""
    grid = [s // patch for s in x.shape[2:]]
    errors = []
    for b in range(x.shape[0]):
        for i in np.flatnonzero(mask[b]):
            where = (slice(None),) + tuple(slice(g * patch, (g + 1) * patch) for g in np.unravel_index(i, grid))
            target = x[b][where].astype(np.float64)
            target = (target - target.mean()) / np.sqrt(target.var() + eps)
            errors.append(np.mean((pred[b][where] - target) ** 2))
    return float(np.mean(errors))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_is_the_hand_written_masked_patch_mse(spatial_dims):
    method = spark(spatial_dims).eval()  # eval: BatchNorm's running statistics, so both calls see the same net
    x, mask = t1_crops(spatial_dims), fixed_mask(4, spatial_dims)
    with torch.no_grad():
        loss = float(method.masked_loss(x, mask))
        pred = method.reconstruct(x, mask).double().numpy()
    assert loss == pytest.approx(reference_loss(pred, x.numpy(), mask.numpy(), SPARK.patch_size), rel=1e-5)
    # the mask's orientation: a reconstruction exact on the masked patches (noise elsewhere) scores 0, one
    # exact on the visible patches only does not
    exact = normalised_patches(x.numpy().astype(np.float64), SPARK.patch_size)
    noise = np.random.default_rng(0).normal(size=exact.shape)
    for chosen, expected in ((mask, 0.0), (1 - mask, None)):
        keep = masked_pixels(torch.ones_like(x), chosen, torch.zeros_like(x)).numpy()  # 1 outside `chosen`
        method.reconstruct = lambda *_, fake=exact * (1 - keep) + noise * keep: torch.from_numpy(fake)
        value = float(method.masked_loss(x, mask))
        assert value == pytest.approx(0.0, abs=1e-9) if expected == 0.0 else value > 0.5


def normalised_patches(x: np.ndarray, patch: int, eps: float = 1e-6) -> np.ndarray:
    """x (B, C, *S) with each patch standardised by its own mean and population variance."""
    out = np.empty_like(x)
    grid = [s // patch for s in x.shape[2:]]
    for b in range(x.shape[0]):
        for cell in np.ndindex(*grid):
            where = (b, slice(None)) + tuple(slice(g * patch, (g + 1) * patch) for g in cell)
            out[where] = (x[where] - x[where].mean()) / np.sqrt(x[where].var() + eps)
    return out


def masked_pixels(x: torch.Tensor, mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """x with every masked patch's pixels replaced by `value` (same shape as x)."""
    grid = [s // SPARK.patch_size for s in x.shape[2:]]
    keep = MaskPyramid((1 - mask).reshape(x.shape[0], 1, *grid)).at(x.shape[2:])  # (B, 1, *S)
    return x * keep + value * (1 - keep)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masked_pixels_do_not_leak_and_holes_stay_empty(spatial_dims):
    method = spark(spatial_dims).train()  # train mode: BatchNorm statistics from this batch (visible only)
    x, mask = t1_crops(spatial_dims), fixed_mask(4, spatial_dims)
    noise = masked_pixels(x, mask, 10 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)))
    keep = (1 - mask).reshape(4, 1, *[32 // SPARK.patch_size] * spatial_dims)
    with torch.no_grad():
        clean, noisy = (sparse_resnet_features(method.encoder, im, keep) for im in (x, noise))
        assert torch.equal(method.reconstruct(x, mask), method.reconstruct(noise, mask))
    pyramid = MaskPyramid(keep.float())
    for a, b in zip(clean, noisy):
        assert torch.equal(a, b)  # nothing of the masked pixels reaches any level
        hole = pyramid.at(a.shape[2:]) == 0
        assert (a * hole).abs().max() == 0  # masked positions exactly empty, at every level
    assert (pyramid.at(clean[1].shape[2:]) == 0).any()  # there are holes to check at 1/4 (patch 8)
    # what the sparse path prevents: the dense encoder on the same masked input fills the holes in
    e = method.encoder
    with torch.no_grad():
        dense = e.layer1(e.maxpool(e.act(e.bn1(e.conv1(masked_pixels(x, mask, torch.zeros_like(x)))))))
    assert (dense * (pyramid.at(dense.shape[2:]) == 0)).abs().max() > 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_all_visible_is_the_encoders_own_forward(spatial_dims):
    """With nothing masked the sparse walk is MONAI's ResNet forward: same pooled features, same BatchNorm
    running statistics (the walk follows the encoder's real structure)."""
    method = spark(spatial_dims).train().double()  # float64: the comparison is about structure, not rounding
    dense_encoder = copy.deepcopy(method.encoder).train()
    x = t1_crops(spatial_dims).double()
    keep = torch.ones(4, 1, *[4] * spatial_dims, dtype=torch.float64)
    feats = sparse_resnet_features(method.encoder, x, keep)
    pooled = feats[-1].flatten(2).mean(-1)  # (B, C4): the encoder's avgpool + flatten
    torch.testing.assert_close(pooled, dense_encoder(x), rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(method.encoder.named_buffers(), dense_encoder.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sparse_batch_norm_is_batch_norm_over_the_visible_positions(momentum):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(5, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    reference = torch.nn.BatchNorm1d(5, momentum=momentum)
    reference.load_state_dict(bn.state_dict())
    x = 3 * torch.randn(2, 5, 4, 6, 6) + 1  # (B, C, *S)
    keep = (torch.rand(2, 1, 4, 6, 6) > 0.6).float()
    for _ in range(2):  # twice: the running averages follow BatchNorm's update, not only its first step
        y = sparse_batch_norm(bn, x, keep)
        visible = keep[:, 0].bool()  # (B, *S)
        expected = reference(x.movedim(1, -1)[visible])  # BatchNorm1d on the (N_visible, C) visible vectors
    torch.testing.assert_close(y.movedim(1, -1)[visible], expected, rtol=1e-4, atol=1e-5)
    assert y.movedim(1, -1)[~visible].abs().max() == 0
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(reference, name), msg=name)
    bn.eval(), reference.eval()
    torch.testing.assert_close(sparse_batch_norm(bn, x, keep).movedim(1, -1)[visible],
                               reference(x.movedim(1, -1)[visible]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_is_finite_and_decreases(spatial_dims):
    method = spark(spatial_dims)
    assert method_name(PretrainConfig(encoder=ENCODER, ssl=SSLConfig(spark=SPARK))) == "spark"
    losses, _ = train_losses(method, {"image": t1_crops(spatial_dims)}, steps=8, lr=1e-2)
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pretraining_loop_runs_spark_and_saves_a_loadable_encoder(tmp_path, spatial_dims):
    """train() (the loop every method runs in) on SparK; the checkpoint's encoder keys load into a plain
    encoder (no SparK class needed to fine-tune) and its BatchNorm statistics moved."""
    from medssl.models.encoders import build_encoder
    from medssl.train.checkpoint import load_checkpoint
    from medssl.train.loop import train

    class Log:
        def log_metrics(self, *args, **kwargs):
            pass
    method = spark(spatial_dims)
    before = method.encoder.bn1.running_mean.clone()
    batches = [{"image": t1_crops(spatial_dims)}] * 3
    result = train(method, lambda epoch, position: batches[position:], TrainConfig(steps=3, checkpoint_every=3),
                   tmp_path, Log(), "cpu")
    assert result["step"] == 3
    saved = load_checkpoint(result["checkpoint"])["model"]
    encoder = build_encoder(ENCODER, spatial_dims, [32] * spatial_dims)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in saved.items() if k.startswith("encoder.")})
    assert not torch.equal(encoder.bn1.running_mean, before)
    assert all(math.isfinite(float(p.sum())) for p in encoder.parameters())


def test_spark_with_a_vit_or_an_untiled_crop_is_a_config_error():
    vit = EncoderConfig(name="vit", patch_size=8, hidden_size=48, num_layers=1, num_heads=4, mlp_dim=96)
    with pytest.raises(ConfigError, match="needs a ResNet encoder"):
        build_method(PretrainConfig(encoder=vit, ssl=SSLConfig(spark=SPARK), crop=[32, 32]), 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        PretrainConfig(encoder=ENCODER, ssl=SSLConfig(spark=SPARK), crop=[48, 48])
    with pytest.raises(ValueError, match="multiple of 12"):
        PretrainConfig(encoder=ENCODER, ssl=SSLConfig(spark=SPARK.model_copy(update={"patch_size": 12})),
                       crop=[32, 32])
    with pytest.raises(ValueError, match="nothing to reconstruct"):
        PretrainConfig(encoder=ENCODER, ssl=SSLConfig(spark=SPARK.model_copy(update={"patch_size": 32})),
                       crop=[32, 32])
    with pytest.raises(ValueError, match="cannot be combined"):
        SSLConfig(spark=SPARK, masked={})
