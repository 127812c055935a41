"""RMU: only the selected parameters change, the two loss terms behave as specified, runs are seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sgtm_engine.config import DataSpec, MaskingSpec, ModelSpec, RmuSpec, Strategy, from_dict
from sgtm_engine.data.prepare import prepare_data
from sgtm_engine.errors import ConfigError
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.rmu import control_vector, default_patterns, resolve_layer, rmu, rmu_losses, select_parameters
from sgtm_engine.runtime import Runtime
from sgtm_engine.stage import run_stage

CPU = Runtime(torch.device("cpu"), "fp32")
pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = ModelSpec(n_layer=3, d_model=64, n_head=8, context=32)
DATA = {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 40, "test_docs_per_category": 2}


@pytest.fixture(scope="module")
def data(engine_cache):
    return prepare_data(from_dict(DataSpec, DATA), MODEL.context, engine_cache)


def tiny_model(data, seed: int = 0) -> GPTNeoLM:
    model = GPTNeoLM(MODEL, MaskingSpec(strategy=Strategy.NONE), vocab_size=data.vocab_size)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_only_the_selected_parameters_change_bitwise(data):
    model = tiny_model(data)
    before = snapshot(model)
    spec = RmuSpec(layer_id=1, param_patterns=("transformer.h.1.mlp.c_proj", "transformer.h.0.attn.*.q_proj.weight"),
                   steps=5, lr=1e-3)
    result = rmu(model, data, spec, CPU)
    assert result.updated == ["transformer.h.0.attn.attention.q_proj.weight", "transformer.h.1.mlp.c_proj.weight",
                              "transformer.h.1.mlp.c_proj.bias"]
    for name, value in model.named_parameters():
        changed = not torch.equal(value, before[name])
        assert changed == (name in result.updated), name
        assert value.requires_grad  # restored for whoever trains it next


def test_forget_term_moves_toward_the_control_vector_and_retain_term_starts_at_zero(data):
    model = tiny_model(data)
    spec = RmuSpec(layer_id=1, steps=30, lr=1e-2, log_every=1, alpha=3.0)
    history = rmu(model, data, spec, CPU).history
    assert history[0]["retain_loss"] == 0.0  # the updated copy equals the frozen one before the first step
    assert history[1]["retain_loss"] > 0.0  # ... and drifts once its parameters moved
    assert history[-1]["forget_loss"] < 0.5 * history[0]["forget_loss"]


def test_selected_parameters_behind_the_hooked_layer_never_change(data):
    model = tiny_model(data)
    before = snapshot(model)
    spec = RmuSpec(layer_id=0, param_patterns=("transformer.h.0.mlp.c_fc.weight", "transformer.h.2.mlp"), steps=3,
                   lr=1e-2)
    result = rmu(model, data, spec, CPU)
    assert len(result.updated) == 5
    after = snapshot(model)
    assert not torch.equal(after["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"])
    assert all(torch.equal(after[k], before[k]) for k in after if k != "transformer.h.0.mlp.c_fc.weight")
    with pytest.raises(ConfigError, match="feeds block 0"):  # nothing selected could ever move: refuse
        rmu(tiny_model(data), data, RmuSpec(layer_id=0, param_patterns=("transformer.h.2.mlp",), steps=2), CPU)


def test_rmu_is_seeded(data):
    a, b, c = tiny_model(data), tiny_model(data), tiny_model(data)
    spec = RmuSpec(layer_id=1, steps=3, lr=1e-3)
    rmu(a, data, spec, CPU)
    rmu(b, data, spec, CPU)
    rmu(c, data, RmuSpec(layer_id=1, steps=3, lr=1e-3, seed=7), CPU)
    pa, pb, pc = snapshot(a), snapshot(b), snapshot(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_loss_terms_on_hand_made_activations():
    control = control_vector(4, coef=20.0, seed=0)
    assert torch.allclose(control.norm(), torch.tensor(20.0)) and (control >= 0).all()  # positive orthant
    h = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    at_control = control.expand(2, 3, 4).clone()
    at_control[0, 2] = 99.0  # a padding position: never counted
    lf, lr = rmu_losses(at_control, h, h, control, alpha=100.0, mask_forget=mask, mask_retain=mask)
    assert lf == 0.0 and lr == 0.0
    lf, lr = rmu_losses(control.expand(2, 3, 4) + 1.0, h + 0.5, h, control, 100.0, mask, mask)
    assert torch.isclose(lf, torch.tensor(1.0)) and torch.isclose(lr, torch.tensor(25.0))  # alpha * 0.5^2


def test_layer_and_parameter_defaults_scale_to_depth():
    assert resolve_layer(RmuSpec(), 16) == 7 and default_patterns(7) == tuple(f"transformer.h.{i}.mlp"
                                                                               for i in (5, 6, 7))
    assert resolve_layer(RmuSpec(), 4) == 1 and default_patterns(1) == ("transformer.h.0.mlp", "transformer.h.1.mlp")
    with pytest.raises(ConfigError, match="layer_id=5"):
        resolve_layer(RmuSpec(layer_id=5), 4)
    with pytest.raises(ConfigError, match="param_patterns"):
        select_parameters(GPTNeoLM(MODEL, vocab_size=300), ["transformer.h.9.mlp"])


def test_rmu_stage_writes_a_model_an_attack_can_start_from(tmp_path: Path, engine_cache):
    cache = engine_cache
    train = {"model": {"n_layer": 2, "d_model": 64, "n_head": 8, "context": 32}, "masking": {"strategy": "none"},
             "data": DATA, "steps": 2, "batch_size": 2, "eval": {"capability": False, "max_batches": 1},
             "runtime": {"device": "cpu"}}
    run_stage("train", train, tmp_path / "base", cache_dir=cache)
    rec = run_stage("rmu", {"steps": 2, "eval": {"capability": False, "max_batches": 1}, "runtime": {"device": "cpu"}},
                    tmp_path / "rmu", inputs={"model": tmp_path / "base"}, cache_dir=cache)
    assert rec["method"] == "rmu" and rec["base_method"] == "no_filter" and rec["summary"]["layer_id"] == 0
    assert rec["summary"]["updated_parameters"] == [f"transformer.h.0.mlp.{n}" for n in
                                                    ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")]
    assert Path(rec["artifacts"]["model"]).exists() and "eval/forget/loss" in rec["metrics"]
    base = json.loads((tmp_path / "base" / "result.json").read_text())
    assert rec["manifest_hash"] == base["manifest_hash"] and rec["data_spec"] == base["data_spec"]
