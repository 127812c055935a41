"""The fine-tuning attack: steps to recovery on synthetic curves, held-out documents never attacked, ablation of the
start point, the reference from a baseline stage, torchrun ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from sgtm_engine.attack import attack, prepare_attack_data, start_model
from sgtm_engine.config import AblateSpec, AblationKind, AttackSpec, DataSpec, Split, Strategy, from_dict
from sgtm_engine.errors import ConfigError
from sgtm_engine.model.hf import load_hf
from sgtm_engine.model.masking import region_view
from sgtm_engine.model.partition import Region
from sgtm_engine.recovery import mean_excess, recovery_from_history, steps_to_recovery
from sgtm_engine.runtime import Runtime
from sgtm_engine.stage import read_result, run_stage
from tests.engine.ranks import run_stage_cli

CPU = Runtime(torch.device("cpu"), "fp32")
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {
    "model": {"n_layer": 2, "d_model": 64, "n_head": 8, "context": 32},
    "masking": {"strategy": "none", "forget_mlp_dim": 32, "forget_attn_heads": 2},
    "data": {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 40, "test_docs_per_category": 2},
    "optim": {"lr": 3e-3, "warmup_steps": 2}, "steps": 6, "batch_size": 4, "log_every": 3,
    "eval": {"capability": False}, "runtime": {"device": "cpu"},
}
ATTACK = {"steps": 6, "eval_every": 2, "batch_size": 4, "upsample_forget": 1.7, "save_model": False,
          "optim": {"lr": 1e-3, "warmup_steps": 2}, "runtime": {"device": "cpu"}}

# ---------------------------------------------------------------------------------------------------------------------
# Steps to recovery: a pure function


@pytest.mark.parametrize(("curve", "reference", "expected"), [
    ([(0, 5.0), (25, 4.0), (50, 3.0), (75, 2.5)], 3.0, 50),  # equality counts as recovered
    ([(0, 5.0), (25, 4.9), (50, 4.8)], 3.0, None),  # never recovered
    ([(0, 2.9), (25, 2.0)], 3.0, 0),  # already at the reference before any step (the no-filter model itself)
    ([(0, 5.0), (25, 2.9), (50, 3.5), (75, 2.0)], 3.0, 25),  # non-monotone: the first dip counts
    ([(50, 2.0), (0, 5.0), (25, 2.5)], 3.0, 25),  # order of the records does not matter
    ([(0, math.nan), (25, 2.0)], 3.0, 25),  # NaN is never "recovered"
    ([], 3.0, None),
])
def test_steps_to_recovery_on_synthetic_curves(curve, reference, expected):
    assert steps_to_recovery(curve, reference) == expected


@pytest.mark.parametrize(("curve", "reference", "expected"), [
    ([(0, 5.0), (10, 5.0)], 3.0, 2.0),  # flat above: the gap itself
    ([(0, 5.0), (10, 3.0), (20, 5.0)], 3.0, 1.0),  # two trapezoids of area 10 over 20 steps
    ([(0, 4.0), (10, 2.0)], 3.0, 0.25),  # crosses at step 5: only the triangle above counts (2.5 / 10)
    ([(0, 2.0), (10, 4.0)], 3.0, 0.25),  # crossing upwards
    ([(10, 2.0), (0, 4.0)], 3.0, 0.25),  # order of the records does not matter
    ([(0, 2.0), (10, 1.0)], 3.0, 0.0),  # at or below the reference throughout (the baseline itself)
    ([(0, 5.0), (10, math.nan)], 3.0, None),  # a NaN leaves the area undefined
    ([(0, 5.0)], 3.0, None),
    ([], 3.0, None),
])
def test_mean_excess_on_synthetic_curves(curve, reference, expected):
    assert mean_excess(curve, reference) == (pytest.approx(expected) if expected is not None else None)


@given(st.lists(st.floats(-3.0, 3.0), min_size=2, max_size=8), st.floats(-1.0, 1.0))
def test_mean_excess_is_the_mean_of_the_positive_part_of_the_interpolated_curve(gaps, reference):
    steps = [10 * i for i in range(len(gaps))]
    dense = np.linspace(0, steps[-1], 200_001)
    positive = np.maximum(np.interp(dense, steps, [reference + g for g in gaps]) - reference, 0.0)
    expected = float(np.mean((positive[1:] + positive[:-1]) / 2))
    assert mean_excess(list(zip(steps, [reference + g for g in gaps], strict=True)), reference) == pytest.approx(
        expected, abs=1e-6)


def test_recovery_reports_steps_and_forget_tokens_or_not_recovered():
    history = [{"step": s, "tokens": 100 * s, "forget_tokens": 40 * s, "metrics": {"forget/loss": loss}}
               for s, loss in [(0, 6.0), (10, 5.0), (20, 4.2), (30, 4.5)]]
    rec = recovery_from_history(history, 4.4, "forget/loss", 30)
    assert (rec.step, rec.forget_tokens, rec.tokens) == (20, 800, 2000)
    assert rec.as_dict()["mean_excess_forget_loss"] == pytest.approx(((1.6 + 0.6) / 2 * 10 + 0.6 ** 2 / 0.8 * 5
                                                                       + 0.1 ** 2 / 0.3 * 5) / 30)
    assert rec.describe() == "recovered at step 20 (800 forget tokens)"
    never = recovery_from_history(history, 4.0, "forget/loss", 30)
    assert never.step is None and never.forget_tokens is None
    assert never.describe() == "not recovered within 30 steps"
    assert never.as_dict()["steps_to_recovery"] is None
    shuffled = recovery_from_history(history[::-1], 4.4, "forget/loss", 30)  # the curve's ends are by step
    assert (shuffled.start, shuffled.end, shuffled.as_dict()["end_gap"]) == (6.0, 4.5, pytest.approx(0.1))


# ---------------------------------------------------------------------------------------------------------------------
# The attack on real (tiny) models


@pytest.fixture(scope="module")
def cache(engine_cache) -> Path:
    return engine_cache


@pytest.fixture(scope="module")
def stages(tmp_path_factory, cache) -> Path:
    """A no-filter baseline, a weak filter and an SGTM model, trained a few steps."""
    root = tmp_path_factory.mktemp("stages")
    run_stage("train", TINY, root / "base", cache_dir=cache)
    run_stage("train", {**TINY, "filter": {"kind": "weak"}}, root / "weak", cache_dir=cache)
    run_stage("train", {**TINY, "masking": {**TINY["masking"], "strategy": "sgtm"}}, root / "sgtm", cache_dir=cache)
    return root


@pytest.mark.parametrize("data", ["mixture", "forget_only"])
def test_attack_never_trains_on_held_out_documents(stages, cache, data):
    spec = from_dict(AttackSpec, {**ATTACK, "data": data, "steps": 8})
    prepared = prepare_attack_data(from_dict(DataSpec, TINY["data"]), 32, spec, cache)
    held_out = {d for t in prepared.test_sets.values() for d in t.doc_ids}
    pooled = {d for p in prepared.pools.values() for d in p.doc_ids}
    assert held_out and not held_out & pooled
    model, _ = start_model(_model(stages / "base"), spec.ablate, parent_ablated=False)
    result = attack(model, prepared, spec, CPU, reference=1.0)
    assert result.seen_docs and not result.seen_docs & held_out  # doc ids of every row of every batch
    split_of = {d: p.split for p in prepared.pools.values() for d in p.doc_ids}
    seen_splits = {split_of[d] for d in result.seen_docs}
    assert seen_splits == ({Split.FORGET} if data == "forget_only" else {Split.FORGET, Split.RETAIN})
    assert result.forget_tokens > 0 and (data == "mixture") == (result.forget_tokens < result.tokens)


def test_a_filtered_parent_is_attacked_with_the_forget_data_it_never_saw(stages, cache):
    rec = run_stage("attack", ATTACK, stages / "att_weak", inputs={"model": stages / "weak",
                                                                    "baseline": stages / "base"}, cache_dir=cache)
    assert rec["summary"]["forget_steps"] > 0 and rec["summary"]["test_documents_seen"] == 0
    assert rec["method"] == "weak_filter" and rec["summary"]["ablation"] == "none (clean model)"
    assert [h["step"] for h in rec["history"]] == [0, 2, 4, 6]
    weak = from_dict(DataSpec, rec["data_spec"])
    assert weak == from_dict(DataSpec, TINY["data"])  # the lineage, not the attack's mixture, is inherited


def test_the_baseline_attacked_recovers_at_step_zero_and_bad_references_are_refused(stages, cache):
    rec = run_stage("attack", ATTACK, stages / "att_base", inputs={"model": stages / "base",
                                                                    "baseline": stages / "base"}, cache_dir=cache)
    assert rec["summary"]["steps_to_recovery"] == 0 and rec["summary"]["forget_tokens_to_recovery"] == 0
    assert rec["summary"]["reference_forget_loss"] == rec["history"][0]["metrics"]["forget/loss"]
    assert rec["summary"]["reference_source"] == "baseline model, this attack's evaluation"
    other = json.loads((stages / "base" / "result.json").read_text())
    other["data_spec"]["seed"], other["context"] = 1, 64  # another held-out draw, another truncation
    (stages / "other").mkdir(exist_ok=True)
    (stages / "other" / "result.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="data_spec.seed=1") as e:
        run_stage("attack", ATTACK, stages / "att_other", inputs={"model": stages / "base",
                                                                   "baseline": stages / "other"}, cache_dir=cache)
    assert any("context=64" in str(p) for p in e.value.problems)
    with pytest.raises(ConfigError, match="reference"):
        run_stage("attack", ATTACK, stages / "att_noref", inputs={"model": stages / "base"}, cache_dir=cache)
    far = run_stage("attack", {**ATTACK, "reference_forget_loss": 0.5}, stages / "att_far",
                    inputs={"model": stages / "base"}, cache_dir=cache)
    assert far["summary"]["verdict"] == "not recovered within 6 steps"
    assert far["summary"]["steps"] == 6 and "attack_steps" not in far["summary"]  # the attack's length, one name
    curve = [(h["step"], h["metrics"]["forget/loss"] - 0.5) for h in far["history"]]  # above 0.5 throughout
    area = sum((g0 + g1) / 2 * (s1 - s0) for (s0, g0), (s1, g1) in zip(curve, curve[1:], strict=False))
    assert far["metrics"]["attack/mean_excess_forget_loss"] == pytest.approx(area / 6)
    assert "attack/steps_to_recovery" not in far["metrics"]


def test_masked_parents_are_ablated_then_attacked_as_clean_models(stages):
    for kind in ("zero", "reinit"):
        parent = _model(stages / "sgtm")
        assert parent.masking.strategy == Strategy.SGTM
        clean, how = start_model(parent, AblateSpec(kind=AblationKind(kind), seed=1), parent_ablated=False)
        assert how == kind and clean.masking.strategy == Strategy.NONE and not clean.partition.blocks
        forget = region_view(dict(clean.named_parameters())["transformer.h.0.mlp.c_fc.weight"], parent.partition,
                             "transformer.h.0.mlp.c_fc.weight", Region.FORGET)
        assert (forget == 0).all() == (kind == "zero")
    untouched = _model(stages / "sgtm")
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    clean, how = start_model(untouched, AblateSpec(), parent_ablated=True)  # an ablate stage's output
    assert how == "by the parent stage"
    assert all(torch.equal(before[k], v) for k, v in clean.state_dict().items())


@pytest.mark.slow
def test_two_process_gloo_ddp_attack_matches_one_process(stages, cache, tmp_path):
    """torchrun with 2 CPU ranks (gloo) attacks the SGTM model to where one process gets: each rank takes half of
    every batch, so the curve, the token counts and the weights agree."""
    spec = {**ATTACK, "steps": 4, "save_model": True, "reference_forget_loss": 1.0}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = ["run-stage", "--kind", "attack", "--spec", str(tmp_path / "spec.json"), "--input",
            f"model={stages / 'sgtm'}", "--cache-dir", str(cache)]
    ddp, one = run_stage_cli(args, tmp_path / "ddp", ranks=2), run_stage_cli(args, tmp_path / "one")
    assert ddp["summary"]["ablation"] == one["summary"]["ablation"] == "zero"
    for key in ("tokens", "forget_tokens", "forget_steps", "documents_seen"):  # documents: over both ranks
        assert ddp["summary"][key] == one["summary"][key], key
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in one["history"]] == [0, 2, 4]
    for a, b in zip(ddp["history"], one["history"], strict=True):
        torch.testing.assert_close(a["metrics"], b["metrics"], rtol=1e-4, atol=1e-5)
    a, b = (load_file(str(Path(r["artifacts"]["model"]) / "model.safetensors")) for r in (ddp, one))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _model(workdir: Path):
    return load_hf(read_result(workdir)["artifacts"]["model"])
