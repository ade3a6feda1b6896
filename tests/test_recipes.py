"""The shipped recipes (configs/recipes/*.yaml): each a valid pretrain section once its `use:` pieces resolve."""
from pathlib import Path

import pytest

import yaml

from medssl.config import PipelineConfig, PretrainConfig
from medssl.config.loading import _read_yaml, _resolve_uses

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.joinpath("configs", "recipes").glob("*.yaml"))
# the modality templates (the segmentation template keeps its own MAE + UNETR settings)
TEMPLATES = [ROOT / "pipelines" / f"{name}_template.yaml" for name in ("mr_3d", "ct_3d", "xray_2d")]


def test_there_are_cpu_and_gpu_recipes():
    names = {p.stem for p in RECIPES}
    assert any(n.startswith("cpu") for n in names) and any(n.startswith("gpu") for n in names), names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_a_valid_pretrain_section_with_a_time_budget(path):
    cfg = PretrainConfig.model_validate(_resolve_uses(_read_yaml(path), path.parent))
    assert cfg.train.budget_minutes is not None  # recipes are chosen per budget: they say which


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_templates_take_pretraining_from_a_recipe_and_every_recipe_fits(template):
    """Each modality template's pretrain section is a recipe (plus the modality's overrides), and swapping in
    any other recipe — what its comment tells a user with another budget to do — still validates, 2D included."""
    raw = yaml.safe_load(template.read_text())
    assert (template.parent / raw["pretrain"]["use"]).resolve() in RECIPES
    for recipe in RECIPES:
        raw["pretrain"]["use"] = str(recipe)  # absolute: resolved as is
        cfg = PipelineConfig.model_validate(_resolve_uses(raw, template.parent))
        assert len(cfg.pretrain.crop) == cfg.preprocess.spatial_dims
        assert cfg.pretrain.train.budget_minutes is not None
