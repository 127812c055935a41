"""Overrides behave as OmegaConf users expect, and bad input gets errors people can act on.

`--set` values are YAML 1.2 (`1e-3` is a number); a mapping merges into its block; a typo gets a did-you-mean and no
false follow-on errors; a YAML syntax error is one line with file, line and column; `--print-config` runs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sgtm_engine.config import (
    ModelSpec,
    Problem,
    TrainSpec,
    apply_overrides,
    from_dict,
    merge,
    parse_stages,
    with_overrides,
)
from sgtm_engine.errors import ConfigError
from sgtm_engine.recipe import load_recipe
from sgtm_engine.yamlio import dump_yaml, loads, parse_sets

RECIPE = {"name": "r", "stages": [
    {"name": "train", "kind": "train", "spec": {"model": {"n_layer": 4, "context": 64}, "steps": 5}},
    {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "train"}},
]}


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(p) for p in exc.value.problems]


# ---------------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 1e-3), ("3E-4", 3e-4), ("-2e5", -2e5), ("1.5e-3", 1.5e-3), (".5", 0.5), ("1.0", 1.0),
    ("100", 100), ("-3", -3), ("1_000", 1000), ("true", True), ("false", False), ("null", None),
    ("[1, 2e-1]", [1, 0.2]), ("{n_layer: 2}", {"n_layer": 2}), ("sgtm", "sgtm"), ("'1e-3'", "1e-3"),
])
def test_set_values_are_parsed_as_yaml_with_yaml12_numbers(text: str, value: Any) -> None:
    parsed = parse_sets([f"train.x={text}"])["train.x"]
    assert parsed == value and type(parsed) is type(value)


def test_numbers_in_files_follow_the_same_rule() -> None:
    assert loads("optim: {lr: 1e-3, eps: 1.0e-8}") == {"optim": {"lr": 1e-3, "eps": 1e-8}}


def test_a_set_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_sets(["train.steps"])


# ---------------------------------------------------------------------------------------------------------------------
# Merge


def test_a_mapping_merges_into_its_block_and_keeps_the_siblings() -> None:
    spec = with_overrides(TrainSpec, {"model": {"n_layer": 4, "context": 64}}, parse_sets(["model={n_layer: 2}"]))
    assert spec.model.n_layer == 2 and spec.model.context == 64
    recipe = load_recipe(RECIPE, parse_sets(["train.model={n_layer: 2}", "train.optim.lr=1e-3"]))
    train = recipe.stages[0].spec
    assert (train.model.n_layer, train.model.context, train.optim.lr, train.steps) == (2, 64, 1e-3, 5)


def test_merge_is_deep_and_leaves_its_inputs_alone() -> None:
    base = {"a": {"b": 1, "c": {"d": 2}}, "l": [1, 2]}
    out = merge(base, {"a": {"c": {"e": 3}}, "l": [3]})
    assert out == {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "l": [3]}  # lists are replaced, not merged
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "l": [1, 2]}


def test_null_and_scalars_replace_and_paths_create_blocks() -> None:
    assert apply_overrides({"ablate": {"kind": "zero"}}, {"ablate": None}) == {"ablate": None}
    assert apply_overrides({}, {"optim.lr": 0.1}) == {"optim": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="is a value, not a block"):
        apply_overrides({"steps": 3}, {"steps.x": 1})


def test_a_set_can_repoint_an_input() -> None:
    ablate = {"name": "ablate", "kind": "ablate", "inputs": {"model": "train"}}
    recipe = load_recipe({"stages": [RECIPE["stages"][0], ablate, RECIPE["stages"][1]]},
                         {"evaluate.inputs.model": "ablate"})
    assert recipe.stages[2].inputs == {"model": "ablate"}


# ---------------------------------------------------------------------------------------------------------------------
# Did-you-mean, and no false follow-on errors


def test_a_typo_gets_a_did_you_mean_and_nothing_else() -> None:
    # n_layr leaves n_layer at its default 4, where masked_layers [4, 5] would be out of range: not reported
    with pytest.raises(ConfigError) as e:
        from_dict(TrainSpec, {"model": {"n_layr": 6}, "masking": {"masked_layers": [4, 5]}})
    assert problems(e) == ["model.n_layr: unknown field of ModelSpec; did you mean 'n_layer'?"]
    assert e.value.problems[0] == Problem(("model", "n_layr"), problems(e)[0], None)


def test_a_bad_value_is_not_also_blamed_on_the_fields_it_is_checked_against() -> None:
    # strategy 'nnone' keeps the default 'sgtm', which a weak filter refuses: only the typo is reported
    with pytest.raises(ConfigError) as e:
        from_dict(TrainSpec, {"masking": {"strategy": "nnone"}, "filter": {"kind": "weak"}})
    assert len(e.value.problems) == 1 and "did you mean 'none'?" in problems(e)[0]
    assert e.value.problems[0].loc == ("masking", "strategy") and e.value.problems[0].value == "nnone"
    with pytest.raises(ConfigError) as e:  # a typo'd n_head is not also a divisibility error of d_model
        from_dict(ModelSpec, {"d_model": 96, "n_haed": 3})
    assert problems(e) == ["n_haed: unknown field of ModelSpec; did you mean 'n_head'?"]


def test_cross_field_checks_still_run_when_their_fields_are_fine() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(TrainSpec, {"model": {"n_layer": 2, "bogus": 1}, "masking": {"masked_layers": [3]}})
    assert len(e.value.problems) == 1 and "model.bogus" in problems(e)[0]  # model is suspect: the range is not
    with pytest.raises(ConfigError, match="out of range for n_layer=2"):
        from_dict(TrainSpec, {"model": {"n_layer": 2}, "masking": {"masked_layers": [3]}})


def test_stage_typos_get_a_did_you_mean_without_follow_on_errors() -> None:
    with pytest.raises(ConfigError) as e:
        load_recipe({"stages": [{"name": "train", "knd": "train"}]})
    assert problems(e) == ["stages[0].knd: unknown field of a stage; did you mean 'kind'?"]
    with pytest.raises(ConfigError) as e:
        load_recipe({"stagse": RECIPE["stages"]})
    assert problems(e) == ["stagse: unknown field of a recipe; did you mean 'stages'?"]
    with pytest.raises(ConfigError) as e:
        load_recipe({"stages": [{"name": "train", "kind": "trian"}]})
    assert problems(e) == ["stages[0].kind='trian': must be one of ['train', 'ablate', 'evaluate', 'attack', "
                           "'rmu']; did you mean 'train'?"]
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, {"trian.steps": 3})
    assert problems(e) == ["--set trian.steps: no stage named 'trian'; did you mean 'train.steps'?"]
    with pytest.raises(ConfigError) as e:
        load_recipe({"stages": [*RECIPE["stages"][:1], {"name": "ev", "kind": "evaluate",
                                                        "inputs": {"model": "trian"}}]})
    assert problems(e) == ["ev.inputs.model='trian': must name an earlier stage; did you mean 'train'?"]
    with pytest.raises(ConfigError) as e:
        load_recipe({"stages": [*RECIPE["stages"][:1], {"name": "ev", "kind": "evaluate",
                                                        "inputs": {"modle": "train"}}]})
    assert problems(e) == ["ev.inputs.modle='train': an evaluate stage takes no 'modle' input; did you mean "
                           "'model'?"]


def test_stage_rules_name_inputs_and_kinds() -> None:
    with pytest.raises(ConfigError) as e:
        parse_stages([{"name": "Train", "kind": "train"}, {"name": "ev", "kind": "evaluate"},
                      {"name": "at", "kind": "attack", "inputs": {"model": "ev", "victim": "ev"}}])
    text = " | ".join(problems(e))
    assert "stages[0].name='Train': every stage needs a name; use 1-32 characters" in text
    assert "ev.inputs.model: an evaluate stage needs its 'model' input" in text
    assert "at.inputs.model='ev': an evaluate stage produces no model" in text
    assert "at.inputs.victim='ev': an attack stage takes no 'victim' input; it takes ['model', 'baseline']" in text
    assert ("stages", 2, "inputs", "victim") in [p.loc for p in e.value.problems]


# ---------------------------------------------------------------------------------------------------------------------
# YAML errors and --print-config


BROKEN = "name: r\nstages:\n  - {name: train, kind: train\n  - name: x\n"


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    with pytest.raises(ConfigError) as e:
        load_recipe(str(path))
    (line,) = problems(e)
    assert line.startswith(f"{path}:4:9: invalid YAML") and "\n" not in line


def run_cli(*args: str) -> Any:
    from sgtm_engine.cli import _load_plugins, app

    _load_plugins()
    return CliRunner().invoke(app, list(args))


def test_cli_prints_a_yaml_error_as_one_line_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = run_cli("run", str(path), "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"invalid configuration: {path}:4:9: invalid YAML: while "
                                                  "parsing a flow mapping expected ',' or '}', but got ':'"]
    assert "Traceback" not in result.output


def test_run_print_config_prints_the_resolved_recipe_and_runs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(dump_yaml(RECIPE))
    workdir = tmp_path / "w"
    result = run_cli("run", str(path), "--workdir", str(workdir), "--print-config", "--set", "train.optim.lr=1e-3",
                     "--set", "train.model={n_layer: 2}")
    assert result.exit_code == 0, result.output
    printed = loads(result.output)
    train = printed["stages"][0]["spec"]
    assert train["optim"]["lr"] == 1e-3 and train["model"]["n_layer"] == 2 and train["model"]["context"] == 64
    assert train["noise"]["recall"] == 1.0  # every default is filled in
    assert load_recipe(printed).stages[0].spec == load_recipe(RECIPE, {"train.optim.lr": 1e-3,
                                                                       "train.model": {"n_layer": 2}}).stages[0].spec
    assert not workdir.exists()


def test_submit_print_config_prints_the_body_and_sends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(dump_yaml(RECIPE))
    # nothing listens on port 9: a request would fail with "cannot reach" and exit 2
    result = run_cli("submit", str(path), "--print-config", "--set", "train.steps=7",
                     "--url", "http://127.0.0.1:9", "--data-root", str(tmp_path))
    assert result.exit_code == 0, result.output
    printed = loads(result.output)
    assert printed["stages"][0]["spec"]["steps"] == 7 and printed["stages"][1]["inputs"] == {"model": "train"}
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml({"kind": "train", "spec": {"steps": 3}}))
    result = run_cli("submit", str(job), "--print-config", "--set", "optim.lr=1e-3", "--url", "http://127.0.0.1:9",
                     "--data-root", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert loads(result.output)["spec"]["optim"]["lr"] == 1e-3


def test_submit_reports_bad_input_without_sending(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(dump_yaml(RECIPE))
    result = run_cli("submit", str(path), "--set", "trian.steps=7", "--url", "http://127.0.0.1:9",
                     "--data-root", str(tmp_path))
    assert result.exit_code == 2 and "did you mean 'train.steps'?" in result.output
    assert "cannot reach" not in result.output
