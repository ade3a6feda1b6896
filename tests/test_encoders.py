"""Every registered encoder in 2D and 3D; the encoder file round trip, wrapper prefixes and clear failures."""
import pytest
import torch

from medssl.config import EncoderConfig
from medssl.errors import ConfigError, TrainingError
from medssl.models.encoders import ENCODERS, build_encoder, load_encoder, save_encoder
from medssl.models.heads import linear_head, projection_head

TINY_VIT = dict(patch_size=4, hidden_size=24, num_layers=1, num_heads=2, mlp_dim=32)
WIDTH = {"resnet10": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "vit": 24}


def cfg_for(name: str, channels: int = 1) -> EncoderConfig:
    return EncoderConfig(name=name, in_channels=channels, **TINY_VIT)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_encoder_builds_and_pools(name, spatial_dims):
    size = [16] * spatial_dims
    enc = build_encoder(cfg_for(name, channels=2), spatial_dims, size).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 2, *size))
    assert enc.out_features == WIDTH[name] and out.shape == (2, WIDTH[name])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_vit_keep_index_selects_tokens(spatial_dims):
    enc = build_encoder(cfg_for("vit"), spatial_dims, [8] * spatial_dims).eval()
    x = torch.randn(2, 1, *[8] * spatial_dims)
    keep = torch.tensor([[0, 2], [1, 3]])
    assert enc.forward_tokens(x).shape == (2, 2 ** spatial_dims, 24)
    assert enc.forward_tokens(x, keep).shape == (2, 2, 24)


@pytest.mark.parametrize("name,spatial_dims", [("resnet10", 3), ("vit", 2), ("vit", 3)])
def test_save_load_roundtrip(tmp_path, name, spatial_dims):
    size = [16] * spatial_dims
    enc = build_encoder(cfg_for(name), spatial_dims, size).eval()
    path = save_encoder(tmp_path / "enc.pt", enc, cfg_for(name), spatial_dims, size,
                        pretrain_run_id="abc", manifest_digest="d1", method="masked")
    loaded, info = load_encoder(path)
    assert info["pretrain_run_id"] == "abc" and info["method"] == "masked" and "state_dict" not in info
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), enc(x), atol=1e-6)


class Wrapped(torch.nn.Module):
    def __init__(self, inner, attr):
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("wrappers", [["module"], ["_orig_mod"], ["_orig_mod", "module"]])
def test_prefixed_states_load_without_surgery(tmp_path, wrappers):
    enc = build_encoder(cfg_for("vit"), 2, [8, 8])
    wrapped = enc
    for attr in wrappers:  # what DDP ("module.") and torch.compile ("_orig_mod.") do to state_dict keys
        wrapped = Wrapped(wrapped, attr)
    assert next(iter(wrapped.state_dict())).startswith(wrappers[-1] + ".")
    path = save_encoder(tmp_path / "enc.pt", wrapped, cfg_for("vit"), 2, [8, 8])
    payload = torch.load(path, weights_only=True)
    assert set(payload["state_dict"]) == set(enc.state_dict())
    loaded, _ = load_encoder(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in enc.state_dict().items())


def test_wrong_architecture_names_the_keys(tmp_path):
    enc = build_encoder(cfg_for("vit"), 2, [8, 8])
    path = save_encoder(tmp_path / "enc.pt", enc, cfg_for("vit"), 2, [8, 8])
    payload = torch.load(path, weights_only=True)
    payload["encoder"]["num_layers"] = 2  # file claims 2 blocks, holds 1
    torch.save(payload, path)
    with pytest.raises(TrainingError, match=r"missing keys: blocks\.1\."):
        load_encoder(path)
    payload["encoder"]["num_layers"], payload["encoder"]["hidden_size"] = 1, 48
    torch.save(payload, path)
    with pytest.raises(TrainingError, match=r"shape mismatches: blocks\.0\..*file \(24,\) vs model \(48,\)"):
        load_encoder(path)


def test_unreadable_sources_are_training_errors(tmp_path):
    with pytest.raises(TrainingError, match="not found"):
        load_encoder(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read"):
        load_encoder(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(TrainingError, match="medssl-encoder/1"):
        load_encoder(tmp_path / "other.pt")


def test_loads_from_an_mlflow_run_uri(tmp_path, monkeypatch):
    import mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    enc = build_encoder(cfg_for("resnet10"), 2, [16, 16])
    path = save_encoder(tmp_path / "encoder.pt", enc, cfg_for("resnet10"), 2, [16, 16])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("enc-test")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(path), artifact_path="encoder")
    loaded, info = load_encoder(f"runs:/{run.info.run_id}/encoder/encoder.pt")
    assert info["spatial_dims"] == 2 and loaded.out_features == 512


@pytest.mark.parametrize("kwargs,size,match", [
    (dict(name="vit", patch_size=16), [24, 24], "not divisible by the ViT patch size"),
    (dict(name="vit", hidden_size=30, num_heads=4), [16, 16], "num_heads"),
    (dict(name="resnet18"), [16, 16, 16], "has 3 values for a 2D model"),
])
def test_invalid_combinations_are_config_errors(kwargs, size, match):
    with pytest.raises(ConfigError, match=match):
        build_encoder(EncoderConfig(**kwargs), 2, size)


def test_heads():
    assert projection_head(32, 16)(torch.randn(4, 32)).shape == (4, 16)
    assert linear_head(32, 3)(torch.randn(4, 32)).shape == (4, 3)


def test_file_with_broken_settings_is_a_training_error(tmp_path):
    enc = build_encoder(cfg_for("vit"), 2, [8, 8])
    path = save_encoder(tmp_path / "enc.pt", enc, cfg_for("vit"), 2, [8, 8])
    payload = torch.load(path, weights_only=True)
    payload["encoder"]["name"] = "resnet999"
    torch.save(payload, path)
    with pytest.raises(TrainingError, match="invalid settings"):
        load_encoder(path)


@pytest.mark.parametrize("name,expected", [("resnet10", 128), ("resnet50", 512)])
def test_resnet_width_multiplier_scales_features(name, expected):
    enc = build_encoder(EncoderConfig(name=name, width=0.25), 2, [16, 16]).eval()
    with torch.no_grad():
        assert enc(torch.randn(2, 1, 16, 16)).shape == (2, expected) and enc.out_features == expected
