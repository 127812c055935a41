"""The config schema: validation reports every problem at once, dict round trips, overrides, no torch import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sgtm_engine.config import (
    MODEL_PRESETS,
    AttackSpec,
    EvaluateSpec,
    MaskingSpec,
    ModelSpec,
    RmuSpec,
    Strategy,
    TrainSpec,
    apply_stage_overrides,
    from_dict,
    parse_stages,
    spec_hash,
    to_dict,
    with_overrides,
)
from sgtm_engine.errors import ConfigError, Problem, render_value
from sgtm_engine.yamlio import parse_sets


def test_every_problem_is_reported_at_once_with_field_paths():
    with pytest.raises(ConfigError) as e:
        from_dict(TrainSpec, {"steps": 0, "model": {"d_model": 100, "bogus": 1},
                              "masking": {"strategy": "sgtmm", "forget_mlp_dim": -1}})
    text = "\n".join(map(str, e.value.problems))
    for fragment in ("steps=0", "model.d_model=100", "model.bogus: unknown field", "masking.strategy='sgtmm'",
                     "masking.forget_mlp_dim=-1"):
        assert fragment in text
    assert len(e.value.problems) == 5


def test_a_problem_keeps_what_it_says_after_its_location_wherever_it_is_nested():
    """`detail` is the message after its location, so a caller that shows a problem at another place (a sweep's grid
    axis) writes its own label before it instead of cutting the old location out of the text."""
    inner = Problem.at(("optim", "lr"), "must be > 0", -1.0)
    assert (inner.msg, inner.detail) == ("optim.lr=-1.0: must be > 0", "=-1.0: must be > 0")
    staged = inner.nested(("stages", 0, "spec"), label="train")
    assert (staged.loc, staged.msg, staged.detail) == (("stages", 0, "spec", "optim", "lr"),
                                                       "train.optim.lr=-1.0: must be > 0", "=-1.0: must be > 0")
    assert staged.nested(("body",), label="").detail == staged.detail
    bare = Problem.at((), "a sweep is a mapping").nested(("base",))
    assert (bare.msg, bare.detail) == ("base: a sweep is a mapping", ": a sweep is a mapping")
    assert Problem.at(("seeds",), "each seed once").detail == ": each seed once"  # no value to show


@pytest.mark.parametrize(("override", "shown"), [
    ("train.data.corpus=null", "train.data.corpus=null: expected a string"),
    ("train.optim.lr=true", "train.optim.lr=true: expected a number"),
    ("train.optim.betas=[0.9, null]", "train.optim.betas[1]=null: expected a number"),
    ("train.steps=abc", "train.steps='abc': expected an integer"),
])
def test_a_value_is_shown_as_the_yaml_or_json_that_carried_it(override: str, shown: str) -> None:
    """YAML and JSON say null, true and false; a message that said None or True would name a value nobody wrote."""
    stages = [{"name": "train", "kind": "train", "spec": {}}]
    with pytest.raises(ConfigError) as e:
        parse_stages(apply_stage_overrides(stages, parse_sets([override])))
    assert [str(p) for p in e.value.problems] == [shown]
    assert render_value({"a": [None, True, 1.5, "x"]}) == "{'a': [null, true, 1.5, 'x']}"


def test_forget_sizes_are_exclusive_and_checked_against_the_model():
    with pytest.raises(ConfigError, match="not both"):
        MaskingSpec(forget_param_perc=3, forget_mlp_dim=64)
    with pytest.raises(ConfigError, match="masking.forget_attn_heads=32"):
        from_dict(TrainSpec, {"masking": {"forget_attn_heads": 32}})
    with pytest.raises(ConfigError, match="masked_layers"):
        from_dict(TrainSpec, {"masking": {"masked_layers": [7]}})


def test_round_trip_and_hash_are_stable():
    spec = from_dict(TrainSpec, {"model": {"n_layer": 2}, "masking": {"strategy": "gradient_routing",
                                                                      "masked_layers": [0, 1]}})
    again = from_dict(TrainSpec, to_dict(spec))
    assert again == spec and spec_hash(again) == spec_hash(spec)
    assert spec.masking.strategy is Strategy.GRADIENT_ROUTING and spec.masking.masked_layers == (0, 1)


def test_overrides_use_dotted_paths_and_validate():
    spec = with_overrides(TrainSpec, {}, {"optim.lr": 3e-4, "masking.strategy": "none", "steps": 7})
    assert spec.optim.lr == 3e-4 and spec.steps == 7
    with pytest.raises(ConfigError, match="optim.lr"):
        with_overrides(TrainSpec, {}, {"optim.lr": -1.0})


def test_filters_are_for_clean_models_only():
    with pytest.raises(ConfigError, match="filter.kind=weak"):
        from_dict(TrainSpec, {"filter": {"kind": "weak"}})
    from_dict(TrainSpec, {"filter": {"kind": "weak"}, "masking": {"strategy": "none"}})


def test_compile_is_for_the_stages_that_take_a_training_step():
    """`runtime.compile` compiles the training step; an evaluate or RMU stage asking for it would be told it ran
    compiled when nothing was, so it is refused, naming the field."""
    for spec_cls in (TrainSpec, AttackSpec):
        assert from_dict(spec_cls, {"runtime": {"compile": True}}).runtime.compile
    for spec_cls, kind in ((EvaluateSpec, "an evaluate"), (RmuSpec, "an rmu")):
        with pytest.raises(ConfigError) as e:
            from_dict(spec_cls, {"runtime": {"compile": True}})
        (problem,) = e.value.problems
        assert problem.loc == ("runtime", "compile") and f"{kind} stage has none: set false" in problem.msg


def test_presets_cover_the_papers_eight_shapes():
    paper = {n for n in MODEL_PRESETS if n.startswith(("ts-", "wiki-"))}
    assert len(paper) == 8
    assert ModelSpec.preset("ts-64m", context=128).context == 128
    with pytest.raises(ConfigError, match="known|choose"):
        ModelSpec.preset("gpt-5")


def test_config_imports_without_torch():
    code = "import sys, sgtm_engine.config, sgtm_engine.errors; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
