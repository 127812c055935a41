"""Every shipped recipe parses and validates; bad recipes fail with every problem named."""

from __future__ import annotations

import pytest

from sgtm_engine.errors import ConfigError
from sgtm_engine.recipe import RECIPE_DIR, find_recipe, load_recipe, read_sweep

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


def test_a_folder_in_the_working_directory_does_not_hide_a_name(tmp_path, monkeypatch):
    """`sgtm sweep demo` run where a `demo/` folder exists (a run folder, a clone) still finds the shipped sweep; a
    name that is only a folder is refused as one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "runs").mkdir()
    assert read_sweep("demo")["name"] == "demo"
    assert find_recipe("wiki-bilingual-sgtm") == RECIPE_DIR / "wiki-bilingual-sgtm.yaml"
    with pytest.raises(ConfigError, match="'runs': a folder, not a file, and not a recipe name; known recipes"):
        find_recipe("runs")


def test_the_demo_alias_runs_the_shipped_sweep_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sgtm_engine.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("echo a script of the user's\n")
    (tmp_path / "attack-matrix").mkdir()
    for command in ("demo", "attack-matrix"):  # the shipped file, expanded and refused at train.steps: nothing runs
        out = CliRunner().invoke(app, [command, "--set", "train.steps=0", "--no-track"]).output
        assert "train.steps=0" in out and "expected a sweep" not in out and "a folder" not in out, out
