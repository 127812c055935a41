"""Sweep expansion (`sgtm_engine.sweep`): cell counts and order, overrides landing in the right stage, seeds,
variants that drop stages, stable and distinct cell ids, and every problem reported at once with its location."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from sgtm_engine.errors import ConfigError
from sgtm_engine.sweep import SweepError, apply_sweep_overrides, default_seed_paths, parse_sweep

TINY = {"model": {"n_layer": 2, "d_model": 64, "context": 64}, "steps": 5}
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "sweeps"


def doc(**extra: Any) -> dict[str, Any]:
    base = {"kind": "sweep", "name": "t", "base": {"stages": [
        {"name": "train", "kind": "train", "spec": copy.deepcopy(TINY)},
        {"name": "ablate", "kind": "ablate", "inputs": {"model": "train"}},
        {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "ablate"}},
    ]}}
    base.update(extra)
    return base


VARIANTS = {"sgtm": {"train.masking.strategy": "sgtm", "train.noise.retain_retain_frac": 0.25},
            "recall_filter": {"train.masking.strategy": "none", "train.filter.kind": "weak", "ablate": None,
                              "evaluate.inputs.model": "train"}}


def problems_of(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(SweepError) as info:
        parse_sweep(data)
    return [(p.loc, p.msg) for p in info.value.problems]


def test_cells_are_variants_times_grid_times_seeds_in_a_fixed_order() -> None:
    sweep = parse_sweep(doc(variants=VARIANTS, grid={"train.noise.recall": [1.0, 0.9, 0.5],
                                                     "train.optim.lr": [1e-3, 3e-3]}, seeds=[0, 1]))
    assert len(sweep.cells) == 2 * 3 * 2 * 2
    assert [c.position for c in sweep.cells] == list(range(24))
    first, second, third = sweep.cells[:3]
    assert (first.variant, first.params, first.seed) == ("sgtm", {"train.noise.recall": 1.0, "train.optim.lr": 1e-3}, 0)
    assert (second.params, second.seed) == (first.params, 1)  # seeds vary fastest, then the last axis
    assert third.params == {"train.noise.recall": 1.0, "train.optim.lr": 3e-3}
    assert sweep.cells[-1].variant == "recall_filter" and sweep.cells[-1].params["train.noise.recall"] == 0.5
    again = parse_sweep(doc(variants=VARIANTS, grid={"train.noise.recall": [1.0, 0.9, 0.5],
                                                     "train.optim.lr": [1e-3, 3e-3]}, seeds=[0, 1]))
    assert [c.cell_id for c in again.cells] == [c.cell_id for c in sweep.cells]  # stable
    assert len({c.cell_id for c in sweep.cells}) == 24  # distinct


def test_overrides_land_in_the_right_stage_and_seeds_set_every_seed_path() -> None:
    sweep = parse_sweep(doc(grid={"train.noise.recall": [0.8], "evaluate.calibrate.steps": [7]}, seeds=[5]))
    stages = {s["name"]: s for s in sweep.cells[0].stages}
    train, evaluate = stages["train"]["spec"], stages["evaluate"]["spec"]
    assert train["noise"]["recall"] == 0.8 and train["model"]["n_layer"] == 2  # merged into the base, not replacing
    assert evaluate["calibrate"]["steps"] == 7 and "steps" not in stages["ablate"]["spec"]
    assert train["seed"] == 5 and train["noise"]["seed"] == 5
    assert train["optim"]["lr"] == 1e-3  # canonical: defaults are filled in
    assert sweep.seed_paths == ["train.seed", "train.noise.seed"]
    assert default_seed_paths([{"name": "a", "kind": "attack"}, {"name": "e", "kind": "evaluate"}]) == ["a.seed"]
    explicit = parse_sweep(doc(seeds=[3], seed_paths=["train.data.seed"]))
    spec = explicit.cells[0].stages[0]["spec"]
    assert spec["data"]["seed"] == 3 and spec["seed"] == 0


def test_a_mapping_value_merges_into_the_base_mapping() -> None:
    sweep = parse_sweep(doc(variants={"wide": {"train.model": {"d_model": 128}}, "base": None}))
    wide = sweep.cells[0].stages[0]["spec"]["model"]
    assert wide["d_model"] == 128 and wide["n_layer"] == 2 and wide["context"] == 64


def test_a_variant_drops_a_stage_and_repoints_its_consumer() -> None:
    sweep = parse_sweep(doc(variants=VARIANTS, seeds=[0]))
    sgtm, filt = sweep.cells
    assert [s["name"] for s in sgtm.stages] == ["train", "ablate", "evaluate"]
    assert [s["name"] for s in filt.stages] == ["train", "evaluate"]
    assert filt.stages[1]["inputs"] == {"model": "train"} and sgtm.stages[2]["inputs"] == {"model": "ablate"}
    assert filt.stages[0]["spec"]["filter"]["kind"] == "weak"


def test_dropping_a_stage_composes_with_seed_paths_into_it() -> None:
    """Seeds go to every stage that has one (ablate has none here, attack does); dropping the attack in one variant
    is not a clash with the seed path `attack.seed`."""
    data = doc(variants={"full": None, "no_attack": {"attack": None}}, seeds=[0, 1])
    data["base"]["stages"].append({"name": "attack", "kind": "attack", "inputs": {"model": "train"},
                                   "spec": {"reference_forget_loss": 5.0}})
    sweep = parse_sweep(data)
    assert "attack.seed" in sweep.seed_paths
    full = [c for c in sweep.cells if c.variant == "full"]
    assert [s["spec"]["seed"] for c in full for s in c.stages if s["name"] == "attack"] == [0, 1]
    assert all("attack" not in [s["name"] for s in c.stages] for c in sweep.cells if c.variant == "no_attack")


def test_cell_ids_follow_content_not_names() -> None:
    """The same resolved pipeline hashes the same from another sweep (renamed, other variant name, other order of
    keys); any change of spec or seed changes it."""
    a = parse_sweep(doc(grid={"train.noise.recall": [0.9]}, seeds=[0]))
    b = parse_sweep(doc(name="other", variants={"x": {"train.noise.recall": 0.9}}, seeds=[0]))
    c = parse_sweep(doc(grid={"train.noise.recall": [0.9]}, seeds=[1]))
    d = parse_sweep(doc(grid={"train.noise.recall": [0.9], "train.steps": [6]}, seeds=[0]))
    explicit_default = doc(grid={"train.noise.recall": [0.9]}, seeds=[0])
    explicit_default["base"]["stages"][0]["spec"]["optim"] = {"lr": 1e-3}  # the default, spelled out
    e = parse_sweep(explicit_default)
    assert a.cells[0].cell_id == b.cells[0].cell_id == e.cells[0].cell_id
    assert len({a.cells[0].cell_id, c.cells[0].cell_id, d.cells[0].cell_id}) == 3


def test_every_problem_is_reported_at_once_with_its_location() -> None:
    found = problems_of(doc(grid={"train.noise.recall": [1.0, 1.5], "train.nope": [1], "zzz.steps": [1],
                                  "train.model.n_layer.x": [1]},
                            variants={"bad": {"ablate": None}, "dupe": {"train.steps": 5}},
                            seeds=[0, "x"], extra=1))
    locs = dict(found)
    assert locs[("grid", "train.noise.recall", 1)] == "grid.train.noise.recall=1.5: must be a probability in [0, 1]"
    assert "train.nope: unknown field of TrainSpec; known fields" in locs[("grid", "train.nope")]
    assert "no stage named 'zzz'" in locs[("grid", "zzz.steps")]
    assert "is a value, not a block" in locs[("grid", "train.model.n_layer.x")]
    assert "re-point it" in locs[("variants", "bad", "ablate")]
    assert "integers" in locs[("seeds",)]
    assert "unknown field of a sweep; known fields" in locs[("extra",)]


def test_a_misspelt_key_gets_a_did_you_mean_in_the_file_and_in_set() -> None:
    found = dict(problems_of(doc(sedes=[0], base={**doc()["base"], "stages_": []})))
    assert found[("sedes",)] == "sedes: unknown field of a sweep; did you mean 'seeds'?"
    assert "did you mean 'stages'?" in found[("base", "stages_")]
    with pytest.raises(SweepError) as err:
        apply_sweep_overrides(doc(), {"sedes": [1]})
    assert err.value.problems[0].msg == "--set sedes: unknown field of a sweep; did you mean 'seeds'?"
    with pytest.raises(ConfigError, match="no stage named 'zzz'"):  # nothing close: a stage override, as before
        apply_sweep_overrides(doc(), {"zzz": 1})


def test_conflicts_and_no_op_cells_are_rejected() -> None:
    found = dict(problems_of(doc(grid={"train.noise.recall": [0.5]}, variants={"a": {"train.noise.recall": 0.4}},
                                 seeds=[0])))
    assert "overlaps a grid axis" in found[("variants", "a", "train.noise.recall")]
    found = dict(problems_of(doc(grid={"train.seed": [1, 2]}, seeds=[0])))
    assert "overlaps seed path" in found[("grid", "train.seed")]
    same = problems_of(doc(variants={"a": {"train.steps": 5}, "b": {}}))  # steps=5 is the base already
    assert any("resolve to the same pipeline" in msg for _loc, msg in same)
    assert "on the same field" not in str(same)


def test_structural_problems() -> None:
    assert "needs a non-empty 'stages' list" in problems_of({"kind": "sweep"})[0][1]
    found = dict(problems_of({"kind": "sweep", "base": {"stages": [
        {"name": "train", "kind": "bake"}, {"name": "e", "kind": "evaluate", "inputs": {"model": "later"}}]}}))
    assert "one of" in found[("base", "stages", 0, "kind")]
    assert "must name an earlier stage" in found[("base", "stages", 1, "inputs", "model")]
    found = dict(problems_of(doc(grid={"train.steps": [], "train.optim.lr": 3e-3})))
    assert "non-empty list" in found[("grid", "train.steps")] and "non-empty list" in found[("grid", "train.optim.lr")]
    found = dict(problems_of(doc(grid={"train.optim.lr": [1e-3, 3e-3, 1e-3, 0.001, 3e-3]})))
    assert found[("grid", "train.optim.lr")] == ("grid.train.optim.lr: values [0.001, 0.003] repeat; list each value "
                                                 "once")  # each once, as written
    with pytest.raises(SweepError, match="at most 10 per sweep"):
        parse_sweep(doc(grid={"train.steps": list(range(1, 12))}), max_cells=10)


def test_the_shipped_sweep_recipes_expand() -> None:
    for path in sorted(RECIPES.glob("*.yaml")):
        sweep = parse_sweep(yaml.safe_load(path.read_text()))
        assert sweep.cells, path


def test_stages_sharing_a_yaml_anchor_are_overridden_apart() -> None:
    """`spec: *train` makes two stages share one mapping when read; an override of one must not reach the other."""
    data = yaml.safe_load("""
kind: sweep
base:
  stages:
    - {name: reference, kind: train, spec: &train {steps: 5, masking: {strategy: none},
                                           model: {n_layer: 2, d_model: 64, context: 64}}}
    - {name: train, kind: train, spec: *train}
variants: {sgtm: {train.masking.strategy: sgtm, train.model.n_layer: 3}}
""")
    reference, train = parse_sweep(data).cells[0].stages
    assert (reference["spec"]["masking"]["strategy"], reference["spec"]["model"]["n_layer"]) == ("none", 2)
    assert (train["spec"]["masking"]["strategy"], train["spec"]["model"]["n_layer"]) == ("sgtm", 3)
    overridden = apply_sweep_overrides(data, {"train.model.n_layer": 4})["base"]["stages"]
    assert [s["spec"]["model"]["n_layer"] for s in overridden] == [2, 4]
