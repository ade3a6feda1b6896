"""Site views (bias field, lower resolution) on real anatomy, 2D and 3D, against independent computations."""
import itertools
import os

import nibabel
import numpy as np
import pytest
import torch

from medssl.augment.site_views import random_bias_field, random_resolution
from medssl.augment.views import make_views
from medssl.config import ViewsConfig

OFF = ViewsConfig(flip_prob=0, rotate_degrees=0, scale_range=(1, 1), crop_jitter=0, intensity_scale=0,
                  intensity_shift=0, gamma_range=(1, 1), noise_std=0, blur_sigma=(0, 0))


def anatomy(spatial_dims: int) -> torch.Tensor:
    """nibabel's real T1 (33, 41, 25) cropped to 16^3 (or its middle slice), scaled to [0, 1]: (2, 1, *16)."""
    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    vol = np.asarray(nibabel.load(path).get_fdata(), dtype=np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    x = torch.from_numpy(np.stack([vol[:16, 4:20, 4:20], vol[10:26, 12:28, 5:21]]))[:, None]
    return x if spatial_dims == 3 else x[..., 8]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bias_field_is_a_smooth_positive_cubic_log_field(spatial_dims):
    x = anatomy(spatial_dims).double() + 0.1  # no zeros: the field is out / x everywhere
    out = random_bias_field(x, 0.3, gen=torch.Generator().manual_seed(0))
    log_field = (out / x).log()[:, 0].numpy()  # (2, *spatial)
    assert np.all(np.isfinite(log_field)) and not np.allclose(log_field[0], log_field[1])
    # an independent least-squares fit on the monomials of degree <= 3 reproduces it exactly
    coords = np.meshgrid(*[np.linspace(-1, 1, n) for n in x.shape[2:]], indexing="ij")
    columns = [np.ones_like(coords[0])]
    for powers in itertools.product(range(4), repeat=spatial_dims):
        if 1 <= sum(powers) <= 3:
            columns.append(np.prod([c ** p for c, p in zip(coords, powers)], axis=0))
    design = np.stack([c.ravel() for c in columns], 1)
    for sample in log_field:
        coef, *_ = np.linalg.lstsq(design, sample.ravel(), rcond=None)
        assert np.abs(design @ coef - sample.ravel()).max() < 1e-9
        assert abs(coef[0]) < 1e-9  # no constant term: the field changes contrast, not the overall gain
    assert torch.equal(random_bias_field(x, 0.0), x)


def _linear_upsample_1d(a: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """align_corners=False linear upsampling by hand: output i reads source (i + 0.5) / factor - 0.5, edges held."""
    n = a.shape[axis] * factor
    src = np.clip((np.arange(n) + 0.5) / factor - 0.5, 0, a.shape[axis] - 1)
    return np.apply_along_axis(lambda v: np.interp(src, np.arange(len(v)), v), axis, a)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_resolution_by_two_is_block_means_then_linear_upsampling(spatial_dims):
    x = anatomy(spatial_dims)
    out = random_resolution(x, 2.0, 2.0)
    for i in range(2):
        a = x[i, 0].double().numpy()
        blocks = a.reshape(*[s for n in a.shape for s in (n // 2, 2)]).mean(axis=tuple(range(1, 2 * a.ndim, 2)))
        want = blocks
        for axis in range(a.ndim):
            want = _linear_upsample_1d(want, 2, axis)
        np.testing.assert_allclose(out[i, 0].numpy(), want, atol=1e-5)
    torch.testing.assert_close(random_resolution(x, 1.0, 1.0), x)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_site_views_are_off_by_default_and_on_by_config(spatial_dims):
    x = anatomy(spatial_dims)
    assert torch.equal(make_views(x, OFF), x)
    on = OFF.model_copy(update={"bias_field": 0.3, "resolution_range": (1.5, 3.0)})
    view = make_views(x, on, torch.Generator().manual_seed(0))
    assert view.shape == x.shape and torch.isfinite(view).all() and not torch.allclose(view, x, atol=1e-3)


def test_resolution_range_is_validated():
    with pytest.raises(ValueError, match="resolution_range"):
        ViewsConfig(resolution_range=(0.5, 2.0))
