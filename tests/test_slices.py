"""SlicePooled: a 2D encoder over every axial slice of a real 3D volume, pooled, equals the per-slice loop."""
import os

import nibabel
import numpy as np
import pytest
import torch

from medssl.config import EncoderConfig
from medssl.models.encoders import build_encoder
from medssl.models.slices import SlicePooled, slice_pooled


def volumes() -> torch.Tensor:
    """nibabel's real T1 (33, 41, 25) cropped to 32 x 32 x 25, two shifted copies: (2, 1, 32, 32, 25)."""
    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    vol = np.asarray(nibabel.load(path).get_fdata(), dtype=np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    return torch.from_numpy(np.stack([vol[:32, :32], vol[1:33, 9:41]]))[:, None]


@pytest.mark.parametrize("pool", ["mean", "max", "meanmax"])
def test_pooled_features_equal_the_slice_by_slice_loop(pool):
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="resnet10", width=0.25), 2, [32, 32]).eval()
    x = volumes()
    wrapped = SlicePooled(encoder, pool, chunk=7).eval()  # a chunk that does not divide the 25 slices
    with torch.no_grad():
        got = wrapped(x)
        per_slice = torch.stack([torch.stack([encoder(x[i:i + 1, ..., z])[0] for z in range(x.shape[-1])])
                                 for i in range(2)])  # (2, Z, F)
    want = {"mean": per_slice.mean(1), "max": per_slice.amax(1),
            "meanmax": torch.cat([per_slice.mean(1), per_slice.amax(1)], 1)}[pool]
    assert got.shape == (2, wrapped.out_features)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_lesion_in_one_slice_changes_the_max_pooled_features():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="resnet10", width=0.25), 2, [32, 32]).eval()
    x = volumes()[:1]
    lesioned = x.clone()
    lesioned[..., 10:18, 10:18, 3] = 0.0  # far from the central slice (12)
    wrapped = SlicePooled(encoder, "max").eval()
    with torch.no_grad():
        assert not torch.allclose(wrapped(x), wrapped(lesioned))
        central = encoder(x[..., 12]), encoder(lesioned[..., 12])
    torch.testing.assert_close(*central)  # the central slice alone cannot see it


def test_wraps_only_a_2d_encoder_on_3d_data():
    encoder = build_encoder(EncoderConfig(name="resnet10", width=0.25), 2, [32, 32])
    assert isinstance(slice_pooled(encoder, 2, 3), SlicePooled)
    assert slice_pooled(encoder, 2, 2) is encoder and slice_pooled(encoder, 3, 3) is encoder
    with pytest.raises(ValueError, match="unknown slice pooling"):
        SlicePooled(encoder, "attention")
