"""Batched on-device views: shape/dtype/device kept, seeded determinism, each augmentation really acts."""
import os

import nibabel
import numpy as np
import pytest
import torch

from medssl.config import ViewsConfig
from medssl.augment.views import RandomViews, gaussian_blur, make_views, random_cutout, two_views

OFF = ViewsConfig(flip_prob=0, rotate_degrees=0, scale_range=(1, 1), crop_jitter=0, intensity_scale=0,
                  intensity_shift=0, gamma_range=(1, 1), noise_std=0, blur_sigma=(0, 0), cutout_fraction=0)


def anatomy(spatial_dims: int, batch: int = 3) -> torch.Tensor:
    """Crops of nibabel's real T1 (33, 41, 25), scaled to [0, 1]: (B, 1, 16, 16[, 16])."""
    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    vol = np.asarray(nibabel.load(path).get_fdata(), dtype=np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    crops = [vol[4 + 3 * i:20 + 3 * i, 10:26, 5:21] for i in range(batch)]
    x = torch.from_numpy(np.stack(crops))[:, None]  # (B, 1, 16, 16, 16)
    return x if spatial_dims == 3 else x[..., 8]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shape_dtype_device_kept(spatial_dims, dtype):
    x = anatomy(spatial_dims).to(dtype)
    y = make_views(x, ViewsConfig(cutout_fraction=0.1))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_seeded_views_are_deterministic_and_differ_per_sample(spatial_dims):
    x = anatomy(spatial_dims)
    x = x[:1].expand(4, *x.shape[1:]).contiguous()  # four copies of one crop
    a = make_views(x, ViewsConfig(), torch.Generator().manual_seed(7))
    b = make_views(x, ViewsConfig(), torch.Generator().manual_seed(7))
    c = make_views(x, ViewsConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # per-sample parameters, not one draw for the batch


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_identity_config_returns_input(spatial_dims):
    x = anatomy(spatial_dims)
    assert torch.equal(make_views(x, OFF), x)
    assert torch.equal(RandomViews(OFF)(x), x)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flips_mirror_exactly(spatial_dims):
    x = anatomy(spatial_dims)
    y = make_views(x, OFF.model_copy(update={"flip_prob": 1.0}))
    assert torch.allclose(y, x.flip(list(range(2, 2 + spatial_dims))), atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_intensity_changes_values_not_geometry(spatial_dims):
    x = anatomy(spatial_dims)
    y = make_views(x, OFF.model_copy(update={"intensity_scale": 0.3, "intensity_shift": 0.2}))
    assert not torch.allclose(x, y)
    for b in range(x.shape[0]):  # an affine map of the intensities: perfectly correlated per sample
        r = torch.corrcoef(torch.stack([x[b].flatten(), y[b].flatten()]))[0, 1]
        assert float(r) == pytest.approx(1.0, abs=1e-5)
    g = make_views(x, OFF.model_copy(update={"gamma_range": (0.5, 2.0)}))
    assert not torch.allclose(x, g)
    assert torch.allclose(g.amin(dim=list(range(1, g.ndim))), x.amin(dim=list(range(1, x.ndim))), atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rotation_and_zoom_move_the_anatomy(spatial_dims):
    x = anatomy(spatial_dims)
    y = make_views(x, OFF.model_copy(update={"rotate_degrees": 30, "crop_jitter": 0.3}))
    assert y.shape == x.shape and not torch.allclose(x, y, atol=1e-3)
    assert float(y.mean()) > 0.3 * float(x.mean())  # still mostly anatomy, not padding


def test_noise_has_the_configured_scale():
    x = torch.zeros(64, 1, 16, 16)
    y = make_views(x, OFF.model_copy(update={"noise_std": 0.2}))
    assert 0.05 < float(y.std()) < 0.2  # per-sample std ~ U(0, 0.2): average ~0.115


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_smooths_and_keeps_mass(spatial_dims):
    x = anatomy(spatial_dims)
    y = gaussian_blur(x, torch.full((x.shape[0],), 1.5))
    assert float(y.diff(dim=-1).abs().mean()) < 0.7 * float(x.diff(dim=-1).abs().mean())
    assert torch.allclose(y.mean(), x.mean(), rtol=0.05)
    zero = gaussian_blur(x, torch.zeros(x.shape[0]))
    assert torch.allclose(zero, x, atol=1e-5)  # sigma 0 is the identity


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cutout_zeroes_the_configured_share(spatial_dims):
    x = torch.ones(4, 2, *[16] * spatial_dims)
    y = random_cutout(x, 0.125)
    share = (y == 0).float().mean(dim=list(range(1, y.ndim)))
    assert torch.allclose(share, torch.full((4,), 0.125), atol=0.03)


def test_two_views_are_two_different_views():
    v1, v2 = two_views(anatomy(3), ViewsConfig())
    assert v1.shape == v2.shape and not torch.allclose(v1, v2)


@pytest.mark.parametrize("spatial", [[6, 8], [4, 6, 8]])
def test_broadcast_grid_equals_torch_affine_grid(spatial):
    from medssl.augment.views import affine_grid
    nd = len(spatial)
    theta = torch.randn(3, nd, nd + 1)
    rev = list(range(nd - 1, -1, -1))  # torch's theta maps (x, y, z) = reversed array axes
    torch_theta = theta[:, rev][:, :, rev + [nd]]
    expected = torch.nn.functional.affine_grid(torch_theta, [3, 1, *spatial], align_corners=False)
    assert torch.allclose(affine_grid(theta, spatial), expected, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_matches_scipy_per_sample(spatial_dims):
    from scipy.ndimage import gaussian_filter
    x = anatomy(spatial_dims, batch=2)
    sigma = torch.tensor([1.0, 0.5])
    y = gaussian_blur(x, sigma)
    for b in range(2):  # replicate edges = scipy's "nearest"; radius 3 sigma
        ref = gaussian_filter(x[b, 0].numpy(), sigma=float(sigma[b]), mode="nearest", truncate=3.0)
        assert np.allclose(y[b, 0].numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flip_paths_agree(spatial_dims):
    from medssl.augment.views import flip_samples
    x = anatomy(spatial_dims, batch=5)
    code = torch.tensor([0, 1, 2, 3, 2 ** spatial_dims - 1])
    flips = (code[:, None] >> torch.arange(spatial_dims)) & 1 == 1  # bit a = spatial axis a
    gathered, looped = flip_samples(x, flips, per_sample=False), flip_samples(x, flips, per_sample=True)
    assert torch.equal(gathered, looped)
    assert torch.equal(looped[1], x[1].flip([1])) and torch.equal(looped[0], x[0])  # bit 0 = first spatial axis


@pytest.mark.parametrize("shape", [(3, 1, 5, 6, 7), (1, 1, 12, 10, 14), (1, 1, 96, 96, 96)])
@pytest.mark.parametrize("threads", [1, 2])
def test_trilinear_by_rows_equals_grid_sample(shape, threads):
    from medssl.augment.views import affine_grid, random_affine, trilinear_by_rows
    x = torch.rand(shape)  # rough data: the largest step between neighbours
    wide = ViewsConfig(rotate_degrees=60, scale_range=(0.6, 1.5), crop_jitter=0.5)  # zoom-outs sample padding
    theta = random_affine(x, wide, torch.Generator().manual_seed(1))
    expected = torch.nn.functional.grid_sample(x, affine_grid(theta, list(shape[2:])), align_corners=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one sample's rows split over the threads
    try:
        y = trilinear_by_rows(x, theta)
    finally:
        torch.set_num_threads(before)
    # float32 row coordinates over the stacked slices (~9.5k rows at 96^3): ~1e-3 voxel
    assert torch.allclose(y, expected, atol=2e-3 if shape[2] == 96 else 1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_paths_agree(spatial_dims):
    from medssl.augment.views import blur_by_matmul, blur_by_taps
    x = torch.rand(3, 2, *[9, 10, 11][:spatial_dims])
    sigma = torch.tensor([0.0, 0.4, 1.0])
    assert torch.allclose(blur_by_taps(x, sigma, 3), blur_by_matmul(x, sigma, 3), atol=1e-6)


def test_large_cpu_samples_are_made_one_at_a_time():
    from medssl.augment.views import _sample_by_sample
    x = torch.rand(1, 1, 64, 64, 64).expand(2, -1, -1, -1, -1).half()  # two copies of one crop
    assert _sample_by_sample(x, ViewsConfig()) and not _sample_by_sample(x[..., :32], ViewsConfig())
    a = make_views(x, ViewsConfig(), torch.Generator().manual_seed(3))
    b = make_views(x, ViewsConfig(), torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a[0], a[1])
