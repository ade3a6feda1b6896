"""Images on the training device (medssl.data.device_crops): the crops cut there are the CPU loader's crops,
bit for bit, for 3D, 2D and 2D-slices-of-3D, with images smaller than the crop and patient pairs; a pretraining
run with them ends with the same weights as one without."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.config import EncoderConfig, PretrainConfig, TrainConfig
from medssl.train.device_crops import DeviceCrops, bank_bytes, frame_layout, use_device_crops
from medssl.train.loaders import CropDataset, CropPositions, make_loader
from medssl.errors import DataError
from memory_cache import MemoryCache

T1 = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"   # (33, 41, 25) real brain MR
GROUPS = {"a": "p1", "b": "p1", "c": "p2", "d": "p3"}


def t1_images(kind: str) -> MemoryCache:
    """Four images of different shapes cut from the real T1 (float16, as cached): 3D volumes or 2D slices."""
    data = np.asarray(nib.load(T1).dataobj, dtype=np.float32)
    data = (data - data.mean()) / data.std()
    boxes = {"a": (33, 41, 25), "b": (20, 41, 18), "c": (33, 12, 25), "d": (9, 30, 25)}
    arrays = {}
    for n, (image_id, (x, y, z)) in enumerate(boxes.items()):
        volume = data[:x, -y:, :z] * (1 + 0.2 * n)
        arrays[image_id] = (volume[..., z // 2] if kind == "2d" else volume)[None].astype(np.float16)
    return MemoryCache(arrays)


# every test below runs on the CPU (CI); on a machine with a GPU the gather is also checked there
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# crops larger than some images along some axes: those crops are zero-padded around the image (centred)
CASES = [("3d", [16, 24, 20], 3), ("2d", [24, 16], 2), ("slices", [24, 16], 2)]


@pytest.mark.parametrize("kind,crop,dims", CASES)
@pytest.mark.parametrize("pair_by", [None, "patient"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_crops_equal_the_cpu_loaders_crops(kind, crop, dims, pair_by, device):
    cache = t1_images(kind)
    ds = CropDataset(cache, list(GROUPS), crop, dims, seed=4, pair_by=pair_by,
                     groups=GROUPS if pair_by else None)
    bank = DeviceCrops.load(cache, ds.ids, crop, dims, device)
    cpu = make_loader(ds, 3, shuffle=True, seed=4, epochs=3)
    on_device = make_loader(CropPositions(ds), 3, shuffle=True, seed=4, epochs=3)
    n = 0
    for expected, positions in zip(cpu, on_device):
        got = bank.fill({k: v.to(device) for k, v in positions.items()})
        assert set(got) == set(expected) and got["image"].device.type == device
        for key in expected:
            assert torch.equal(got[key].cpu(), expected[key]), key
        n += 1
    assert n == 4  # 3 epochs of 4 images in batches of 3: every image, several crop positions each


def test_small_images_are_padded_centred_as_on_the_cpu():
    frame, offsets = frame_layout([(1, 10, 40), (1, 30, 8)], [20, 12])
    assert frame == [30, 40] and offsets.tolist() == [[5, 0], [0, 2]]


def test_bank_size_and_the_auto_decision():
    cache = t1_images("3d")
    assert bank_bytes(cache, list(GROUPS), [16, 16, 16], 3) == 4 * 33 * 41 * 25 * 2
    cpu = torch.device("cpu")
    assert not use_device_crops("auto", cache, list(GROUPS), [16] * 3, 3, cpu)   # auto: GPUs only
    assert use_device_crops("on", cache, list(GROUPS), [16] * 3, 3, cpu)
    assert not use_device_crops("off", cache, list(GROUPS), [16] * 3, 3, cpu)


def test_mixed_dimensions_are_refused_with_a_message():
    cache = t1_images("3d")
    cache.arrays["e"] = cache.arrays["a"][..., 0]
    with pytest.raises(DataError, match="spatial dims"):
        DeviceCrops.load(cache, list(cache.arrays), [8, 8, 8], 3, "cpu")


class NullTracker:  # medssl.tracking's needs mlflow, which a bare GPU box may lack; keeps the tags
    active_run_id = None

    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_pretraining_with_device_crops_ends_with_the_same_weights(tmp_path, spatial_dims, device):
    """A ViT MAE (on a GPU its kernels are run-to-run deterministic; a 3D ResNet's max-pool backward uses
    atomics, which would hide what this compares)."""
    from medssl.config import MaskedConfig, SSLConfig
    from medssl.models.encoders import load_encoder
    from medssl.train.pretrain import run_pretraining
    cache = t1_images("3d")
    vit = EncoderConfig(name="vit", patch_size=8, hidden_size=24, num_layers=2, num_heads=2, mlp_dim=48)
    masked = SSLConfig(masked=MaskedConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2))
    weights = []
    for setting in ("off", "on"):
        cfg = PretrainConfig(encoder=vit, ssl=masked, crop=[16] * spatial_dims,
                             train=TrainConfig(steps=3, batch_size=2, warmup_steps=1, seed=1, device_crops=setting))
        tracker = NullTracker()
        path = run_pretraining(cfg, cache, list(GROUPS), None, tmp_path / setting, tracker,
                               spatial_dims=spatial_dims, device=device, view_examples=0)
        weights.append(load_encoder(path)[0].state_dict())
        assert tracker.tags["medssl.crops_cut_on"] == (device if setting == "on" else "cpu loader")
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_resumed_with_device_crops_equals_the_uninterrupted_run(tmp_path, device):
    """MAE on a ViT, images on the device: rerunning from the step-2 checkpoint gives the 4-step weights."""
    from medssl.config import MaskedConfig, SSLConfig
    from medssl.models.encoders import load_encoder
    from medssl.train import checkpoint as ckpt
    from medssl.train.pretrain import run_pretraining
    cache = t1_images("3d")
    vit = EncoderConfig(name="vit", patch_size=8, hidden_size=24, num_layers=2, num_heads=2, mlp_dim=48)
    cfg = PretrainConfig(encoder=vit, ssl=SSLConfig(masked=MaskedConfig(decoder_dim=16, decoder_depth=1,
                                                                         decoder_heads=2)),
                         crop=[16, 16, 16], train=TrainConfig(steps=4, batch_size=3, warmup_steps=1, seed=2,
                                                              checkpoint_every=2, device_crops="on"))
    run = lambda: run_pretraining(cfg, cache, list(GROUPS), None, tmp_path, NullTracker(),  # noqa: E731
                                  spatial_dims=3, device=device, view_examples=0)
    path = run()
    uninterrupted = load_encoder(path)[0].state_dict()
    ckpt.checkpoint_path(tmp_path, 4).unlink()   # as if the run had died between steps 2 and 4
    path.unlink()
    resumed = load_encoder(run())[0].state_dict()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6)
