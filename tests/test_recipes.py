"""The shipped recipes (configs/recipes/*.yaml): each a valid pretrain section once its `use:` pieces resolve."""
from pathlib import Path

import pytest

from medssl.config import PretrainConfig
from medssl.config.loading import _read_yaml, _resolve_uses

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "recipes").glob("*.yaml"))


def test_there_are_cpu_and_gpu_recipes():
    names = {p.stem for p in RECIPES}
    assert any(n.startswith("cpu") for n in names) and any(n.startswith("gpu") for n in names), names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_a_valid_pretrain_section_with_a_time_budget(path):
    cfg = PretrainConfig.model_validate(_resolve_uses(_read_yaml(path), path.parent))
    assert cfg.train.budget_minutes is not None  # recipes are chosen per budget: they say which
