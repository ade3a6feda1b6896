"""Config files are validated: unknown keys and wrong types are errors naming the field; `use:` composes."""
from pathlib import Path

import pytest

from medssl.config import PipelineConfig, load_pipeline, apply_overrides
from medssl.errors import ConfigError

PIPELINES = sorted(Path(__file__).resolve().parents[1].joinpath("pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_loads(path):
    cfg = load_pipeline(path)
    assert isinstance(cfg, PipelineConfig)
    assert len(cfg.pretrain.crop) == cfg.preprocess.spatial_dims


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {demo: {}}\npretrain:\n  train:\n    lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(bad)
    assert "pretrain.train.lerning_rate: unknown key" in str(err.value)
    assert str(bad) in str(err.value)


def test_wrong_type_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {demo: {}}\nfinetune: {epochs: many}\n")
    with pytest.raises(ConfigError, match="finetune.epochs"):
        load_pipeline(bad)


def test_use_composes_and_overrides(tmp_path):
    (tmp_path / "enc.yaml").write_text("name: vit\npatch_size: 8\nhidden_size: 64\n")
    main = tmp_path / "p.yaml"
    main.write_text("name: x\ndata: {demo: {}}\npretrain:\n  encoder: {use: enc.yaml, hidden_size: 32}\n")
    cfg = load_pipeline(main)
    assert (cfg.pretrain.encoder.name, cfg.pretrain.encoder.patch_size, cfg.pretrain.encoder.hidden_size) == \
        ("vit", 8, 32)


def test_cli_style_overrides_are_typed(tmp_path):
    main = tmp_path / "p.yaml"
    main.write_text("name: x\ndata: {demo: {}}\n")
    cfg = load_pipeline(main, ["pretrain.train.steps=7", "scale=2.5", "preprocess.spacing=[1,1,2]"])
    assert cfg.pretrain.train.steps == 7 and cfg.scale == 2.5 and cfg.preprocess.spacing == [1, 1, 2]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["nonsense"])


def test_cross_field_rules(tmp_path):
    main = tmp_path / "p.yaml"
    main.write_text("name: x\ndata: {demo: {}}\npreprocess: {spatial_dims: 2, size: [8, 8, 8]}\n")
    with pytest.raises(ConfigError, match="spatial_dims"):
        load_pipeline(main)
    main.write_text("name: x\ndata: {}\n")
    with pytest.raises(ConfigError, match="data.folder"):
        load_pipeline(main)


PIECES = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", PIECES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_piece_is_a_valid_section(path):
    import yaml
    from medssl import config as c
    from medssl.config.loading import _resolve_uses
    section = {"views": c.ViewsConfig, "encoders": c.EncoderConfig, "ssl": c.SSLConfig,
               "preprocess": c.PreprocessConfig, "finetune": c.FinetuneConfig,
               "recipes": c.PretrainConfig}[path.parent.name]
    section.model_validate(_resolve_uses(yaml.safe_load(path.read_text()), path.parent))  # recipes use pieces
