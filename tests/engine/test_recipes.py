"""Every shipped recipe parses and validates; bad recipes fail with every problem named."""

from __future__ import annotations

import pytest

from sgtm_engine.errors import ConfigError
from sgtm_engine.recipe import RECIPE_DIR, load_recipe

RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def test_recipes_exist():
    assert {"wiki-bilingual-sgtm", "paper-tinystories-64m", "paper-wiki-254m"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(str(path))
    assert recipe.stages


def test_paper_recipe_matches_the_papers_shape():
    train = load_recipe("paper-wiki-254m").stages[0].spec
    assert train.model.n_params(50257) == pytest.approx(254_054_000, abs=1_000)
    assert train.masking.mask_embeddings and train.noise.retain_retain_frac == 0.1


def test_bad_recipe_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        load_recipe({"stages": [{"name": "a", "kind": "train", "spec": {"steps": -1}},
                                {"name": "b", "kind": "evaluate", "inputs": {"model": "zzz"}},
                                {"name": "c", "kind": "bake"}]}, overrides={"nope.steps": 3})
    text = " | ".join(map(str, e.value.problems))
    assert "a.steps=-1" in text and "b.inputs.model='zzz'" in text and "stages[2].kind='bake'" in text
    assert "nope.steps" in text
