"""Segmentation networks: a pretrained encoder file loads into the decoder's encoder unchanged (ResNet -> UNet,
ViT -> UNETR, 2D and 3D); Dice / HD95 / surface Dice against hand-computed values."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medssl.config import EncoderConfig
from medssl.errors import TrainingError
from medssl.evaluate.seg_metrics import image_scores, paired_delta, summarise
from medssl.models.decoders import build_segmenter, load_pretrained_encoder
from medssl.models.encoders import build_encoder, load_encoder, save_encoder

ENCODERS = {
    "resnet": dict(name="resnet10", width=0.25),
    "vit": dict(name="vit", patch_size=8, hidden_size=24, num_layers=3, num_heads=2, mlp_dim=48),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_encoder_file_loads_into_segmenter(tmp_path, kind, dims):
    torch.manual_seed(0)
    cfg, size = EncoderConfig(**ENCODERS[kind]), [32] * dims
    pretrained = build_encoder(cfg, dims, size)
    for p in pretrained.parameters():          # weights a fresh build cannot have by chance
        p.data.uniform_(-1, 1)
    path = save_encoder(tmp_path / "encoder.pt", pretrained, cfg, dims, size)
    loaded, info = load_encoder(path)
    net = build_segmenter(build_encoder(cfg, info["spatial_dims"], info["img_size"]), n_classes=3, spatial_dims=dims)
    keys = load_pretrained_encoder(net, loaded.state_dict(), where=str(path))
    decoder_keys = sorted(k for k in net.state_dict() if not k.startswith("encoder."))
    assert keys["unexpected"] == [] and keys["missing"] == decoder_keys and decoder_keys
    for name, value in pretrained.state_dict().items():         # the same names, the same numbers
        assert torch.equal(net.encoder.state_dict()[name], value), name
    out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, 3, *size)
    out.mean().backward()                                        # decoder and encoder both get gradients
    first = next(p for p in net.encoder.parameters() if p.requires_grad)   # the stem / patch-embedding conv
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_mismatched_encoder_names_the_keys():
    small = build_encoder(EncoderConfig(**ENCODERS["vit"]), 2, [32, 32])
    other = build_encoder(EncoderConfig(**{**ENCODERS["vit"], "num_layers": 2}), 2, [32, 32])
    net = build_segmenter(other, 2, 2)
    with pytest.raises(TrainingError, match="unexpected.*blocks.2"):
        load_pretrained_encoder(net, small.state_dict(), where="x")
    wide = build_encoder(EncoderConfig(**{**ENCODERS["vit"], "hidden_size": 36, "num_heads": 2}), 2, [32, 32])
    with pytest.raises(TrainingError, match="shape mismatches.*patch_embed"):
        load_pretrained_encoder(net, wide.state_dict(), where="x")


def test_resnet_patch_must_divide_by_32():
    net = build_segmenter(build_encoder(EncoderConfig(**ENCODERS["resnet"]), 2, [32, 32]), 2, 2)
    with pytest.raises(Exception, match="divisible by 32"):
        net(torch.zeros(1, 1, 48, 48))


# ------------------------------------------------------------------------------------------------ metrics
def test_dice_of_shifted_squares_2d():
    truth = np.zeros((10, 10), int)
    truth[2:6, 2:6] = 1
    pred = np.roll(truth, 1, axis=0)                       # 12 of 16 pixels overlap: Dice 2*12/32
    (row,) = image_scores(pred, truth, 2, spacing=(1.0, 1.0))
    assert row["dice"] == pytest.approx(0.75)
    assert row["hd95"] == pytest.approx(1.0)                # every boundary pixel is at most one pixel away


def test_hd95_and_surface_dice_single_voxels_anisotropic_3d():
    truth, pred = np.zeros((6, 8, 4), int), np.zeros((6, 8, 4), int)
    truth[2, 2, 1], pred[2, 5, 1] = 1, 1                     # 3 voxels apart along axis 1, 2 mm each: 6 mm
    (row,) = image_scores(pred, truth, 2, spacing=(1.0, 2.0, 3.0), tolerance_mm=2.0)
    assert row["dice"] == 0.0 and row["hd95"] == pytest.approx(6.0) and row["surface_dice"] == 0.0
    (row,) = image_scores(pred, truth, 2, spacing=(1.0, 2.0, 3.0), tolerance_mm=7.0)
    assert row["surface_dice"] == pytest.approx(1.0)


def test_multiclass_and_empty_conventions():
    truth = np.zeros((8, 8), int)
    truth[1:3, 1:3], truth[5:7, 5:7] = 1, 2
    pred = truth.copy()
    pred[5:7, 5:7] = 0                                      # class 2 missed entirely
    one, two = image_scores(pred, truth, 3, spacing=(1.0, 1.0))
    assert (one["dice"], one["hd95"], one["surface_dice"]) == (1.0, 0.0, 1.0)
    assert two["dice"] == 0.0 and np.isnan(two["hd95"]) and two["hd95_missing"]
    (empty,) = image_scores(np.zeros((4, 4), int), np.zeros((4, 4), int), 2, spacing=(1, 1))
    assert np.isnan(empty["dice"]) and np.isnan(empty["surface_dice"]) and not empty["hd95_missing"]


def _scores(dice_by_patient: dict[str, list[float]]) -> pd.DataFrame:
    rows = [{"patient_id": p, "image_id": f"{p}-{i}", "class": 1, "dice": d, "hd95": 1.0, "surface_dice": d,
             "hd95_missing": False} for p, ds in dice_by_patient.items() for i, d in enumerate(ds)]
    return pd.DataFrame(rows)


def test_patient_means_weigh_patients_equally_and_paired_delta():
    a = _scores({"p1": [1.0, 0.0], "p2": [0.8], "p3": [0.6]})   # patient means .5, .8, .6
    summary = summarise(a, n_boot=200)
    assert summary["dice"] == pytest.approx((0.5 + 0.8 + 0.6) / 3) and summary["patients"] == 3
    assert summary["dice_low"] <= summary["dice"] <= summary["dice_high"]
    b = _scores({"p1": [0.4, 0.0], "p2": [0.7], "p3": [0.5]})   # each patient exactly 0.1 (p1: .3) lower
    delta, low, high = paired_delta(a, b, n_boot=200)
    assert delta == pytest.approx((0.3 + 0.1 + 0.1) / 3) and 0.1 - 1e-9 <= low <= high <= 0.3 + 1e-9


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_segmentation_package_round_trip(tmp_path, kind):
    from medssl.export.seg_package import load_segmenter, save_segmenter
    cfg = EncoderConfig(**ENCODERS[kind])
    net = build_segmenter(build_encoder(cfg, 2, [32, 32]), 3, 2).eval()
    spec = {"architecture": {"encoder": cfg.model_dump(mode="json"), "spatial_dims": 2, "img_size": [32, 32],
                             "in_channels": 1, "n_classes": 3, "feature_size": 16}, "classes": {"1": "a", "2": "b"}}
    folder = save_segmenter(tmp_path / "model", net, spec)
    loaded, read = load_segmenter(folder)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x)) and read["classes"] == spec["classes"]
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-8] + bytes(8))
    with pytest.raises(TrainingError, match="sha256"):
        load_segmenter(folder)
