"""Every strategy x mode x parameter slice: which gradients are exactly zero, which are not, and the forward.

The expected tables below are written out from docs/method.md §5 (paper App. F) independently of the partition
code, so a broken rule in `Partition` (say, forgetting the c_proj bias) fails here; `test_a_broken_rule_is_caught`
proves it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, Strategy
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.masking import apply_gradient_masks
from sgtm_engine.model.partition import Partition

SPEC = ModelSpec(n_layer=2, d_model=64, n_head=8, context=24, window_size=8, vocab_size=97)
F_MLP, F_HEADS = 16, 2
R_MLP, R_COL = SPEC.mlp_dim - F_MLP, (SPEC.n_head - F_HEADS) * SPEC.head_dim  # retain units; retain q/k/v rows



def _rows(proj: str, rows: slice):
    return lambda g: g[f"transformer.h.0.attn.attention.{proj}_proj.weight"][rows]


# Slices of block 0 (and the model-level ones), each a function of the parameter dict -> tensor view.
SLICES = {
    "c_fc.retain_rows": lambda g: g["transformer.h.0.mlp.c_fc.weight"][:R_MLP],
    "c_fc.forget_rows": lambda g: g["transformer.h.0.mlp.c_fc.weight"][R_MLP:],
    "c_fc.bias.retain": lambda g: g["transformer.h.0.mlp.c_fc.bias"][:R_MLP],
    "c_fc.bias.forget": lambda g: g["transformer.h.0.mlp.c_fc.bias"][R_MLP:],
    "c_proj.retain_cols": lambda g: g["transformer.h.0.mlp.c_proj.weight"][:, :R_MLP],
    "c_proj.forget_cols": lambda g: g["transformer.h.0.mlp.c_proj.weight"][:, R_MLP:],
    "c_proj.bias": lambda g: g["transformer.h.0.mlp.c_proj.bias"],
    **{f"{p}.retain_rows": _rows(p, slice(None, R_COL)) for p in "qkv"},
    **{f"{p}.forget_rows": _rows(p, slice(R_COL, None)) for p in "qkv"},
    "out_proj.retain_cols": lambda g: g["transformer.h.0.attn.attention.out_proj.weight"][:, :R_COL],
    "out_proj.forget_cols": lambda g: g["transformer.h.0.attn.attention.out_proj.weight"][:, R_COL:],
    "out_proj.bias": lambda g: g["transformer.h.0.attn.attention.out_proj.bias"],
    "wte": lambda g: g["transformer.wte.weight"],
    "wpe": lambda g: g["transformer.wpe.weight"],
    "ln_1": lambda g: torch.cat([g["transformer.h.0.ln_1.weight"], g["transformer.h.0.ln_1.bias"]]),
    "ln_2": lambda g: torch.cat([g["transformer.h.0.ln_2.weight"], g["transformer.h.0.ln_2.bias"]]),
    "ln_f": lambda g: torch.cat([g["transformer.ln_f.weight"], g["transformer.ln_f.bias"]]),
    "lm_head.bias": lambda g: g["lm_head.bias"],
}

QKV_R = {"q.retain_rows", "k.retain_rows", "v.retain_rows"}
QKV_F = {"q.forget_rows", "k.forget_rows", "v.forget_rows"}
MLP_IN_R = {"c_fc.retain_rows", "c_fc.bias.retain"}
MLP_IN_F = {"c_fc.forget_rows", "c_fc.bias.forget"}

RETAIN_MODE_ZERO = MLP_IN_F | {"c_proj.forget_cols"} | QKV_F | {"out_proj.forget_cols"}
RETAIN_MODE_ZERO_JOINT_ATTENTION = MLP_IN_F | {"c_proj.forget_cols"}

FORGET_MODE_ZERO = {
    Strategy.NONE: set(),
    Strategy.SGTM: MLP_IN_R | {"c_proj.retain_cols", "c_proj.bias"} | QKV_R | {"out_proj.retain_cols", "out_proj.bias"},
    Strategy.SGTM_JOINT_PROJECTION: MLP_IN_R | QKV_R,
    Strategy.SGTM_JOINT_MLP_PROJECTION: MLP_IN_R | QKV_R | {"out_proj.retain_cols", "out_proj.bias"},
    Strategy.SGTM_JOINT_ATTN_PROJECTION: MLP_IN_R | QKV_R | {"c_proj.retain_cols", "c_proj.bias"},
    Strategy.SGTM_JOINT_ATTENTION: MLP_IN_R,
    Strategy.GRADIENT_ROUTING: MLP_IN_R | QKV_R,
    Strategy.ACTIVATION_MASKING: MLP_IN_R | QKV_R | {"c_proj.retain_cols", "out_proj.retain_cols"},
}


def expected_zero(strategy: Strategy, mode: MaskMode, mask_embeddings: bool) -> set[str]:
    if strategy == Strategy.NONE or mode == MaskMode.DEFAULT:
        return set()
    if mode == MaskMode.RETAIN:
        return RETAIN_MODE_ZERO_JOINT_ATTENTION if strategy == Strategy.SGTM_JOINT_ATTENTION else RETAIN_MODE_ZERO
    zero = set(FORGET_MODE_ZERO[strategy])
    if mask_embeddings:
        zero |= {"wte", "wpe"}  # every strategy; ln_f and the output bias are never masked
        if strategy == Strategy.SGTM:
            zero |= {"ln_1", "ln_2"}  # the paper masks block LayerNorms for exact SGTM only
    return zero


def make_model(strategy: Strategy, mask_embeddings: bool = False, masked_layers=None) -> GPTNeoLM:
    torch.manual_seed(0)
    masking = MaskingSpec(strategy=strategy, forget_mlp_dim=F_MLP, forget_attn_heads=F_HEADS,
                          mask_embeddings=mask_embeddings, masked_layers=masked_layers)
    model = GPTNeoLM(SPEC, masking)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SPEC.vocab_size, (4, SPEC.context), generator=g)
    return ids, torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def grads(model: GPTNeoLM, mode: MaskMode, surgery: bool = True) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=False)
    model.set_mode(mode)
    ids, labels = batch()
    _, loss = model(ids, labels)
    loss.backward()
    if surgery:
        apply_gradient_masks(model, model.partition, mode)
    model.set_mode(MaskMode.DEFAULT)
    return {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}


def check_gradients(strategy: Strategy, mode: MaskMode, mask_embeddings: bool, model: GPTNeoLM | None = None) -> None:
    model = model or make_model(strategy, mask_embeddings)
    g = grads(model, mode)
    zero = expected_zero(strategy, mode, mask_embeddings)
    for name, view in SLICES.items():
        t = view(g)
        if name in zero:
            assert torch.count_nonzero(t) == 0, f"{strategy}/{mode}: {name} should have exactly zero gradient"
        else:
            assert torch.count_nonzero(t) > 0, f"{strategy}/{mode}: {name} should learn but has zero gradient"


@pytest.mark.parametrize("mask_embeddings", [False, True], ids=["emb-joint", "emb-masked"])
@pytest.mark.parametrize("mode", list(MaskMode))
@pytest.mark.parametrize("strategy", list(Strategy))
def test_gradient_zero_pattern(strategy, mode, mask_embeddings):
    check_gradients(strategy, mode, mask_embeddings)


def test_a_broken_rule_is_caught(monkeypatch):
    """Forgetting the c_proj bias in SGTM's surgery must fail the pattern test above."""
    original = Partition._build_frozen

    def without_c_proj_bias(self, mode):
        frozen = original(self, mode)
        return {k: v for k, v in frozen.items() if not k.endswith("mlp.c_proj.bias")}

    monkeypatch.setattr(Partition, "_build_frozen", without_c_proj_bias)
    with pytest.raises(AssertionError, match="c_proj.bias"):
        check_gradients(Strategy.SGTM, MaskMode.FORGET, False)


@pytest.mark.parametrize("strategy", [s for s in Strategy if s != Strategy.NONE])
def test_structural_zeros_come_from_the_forward(strategy):
    """Retain mode (all strategies) and GR/AM forget mode need no surgery: their zeros come from the forward."""
    model = make_model(strategy)
    g = grads(model, MaskMode.RETAIN, surgery=False)
    for name in expected_zero(strategy, MaskMode.RETAIN, False):
        assert torch.count_nonzero(SLICES[name](g)) == 0, name
    if strategy in (Strategy.GRADIENT_ROUTING, Strategy.ACTIVATION_MASKING):
        g = grads(model, MaskMode.FORGET, surgery=False)
        for name in expected_zero(strategy, MaskMode.FORGET, False):
            assert torch.count_nonzero(SLICES[name](g)) == 0, name


@pytest.mark.parametrize("strategy", [Strategy.SGTM, Strategy.SGTM_JOINT_PROJECTION, Strategy.SGTM_JOINT_ATTENTION])
def test_sgtm_forget_slices_receive_the_true_gradient(strategy):
    """SGTM leaves backprop untouched: what the forget slice does receive equals the unmasked gradient."""
    model = make_model(strategy)
    masked, stock = grads(model, MaskMode.FORGET), grads(model, MaskMode.DEFAULT)
    for name in MLP_IN_F | QKV_F | {"c_proj.forget_cols", "out_proj.forget_cols"}:
        torch.testing.assert_close(SLICES[name](masked), SLICES[name](stock), rtol=0, atol=0)


def zeroed_copy(model: GPTNeoLM, side: str) -> GPTNeoLM:
    """A clean copy with one side (forget or retain) of every masked in-projection zeroed."""
    clean = GPTNeoLM(SPEC, MaskingSpec(strategy=Strategy.NONE))
    clean.load_state_dict(copy.deepcopy(model.state_dict()))
    with torch.no_grad():
        for i in range(SPEC.n_layer):
            rows = slice(R_MLP, None) if side == "forget" else slice(None, R_MLP)
            cols = slice(R_COL, None) if side == "forget" else slice(None, R_COL)
            blk = clean.transformer.h[i]
            blk.mlp.c_fc.weight[rows] = 0
            blk.mlp.c_fc.bias[rows] = 0
            if model.masking.strategy != Strategy.SGTM_JOINT_ATTENTION:
                for p in (blk.attn.attention.q_proj, blk.attn.attention.k_proj, blk.attn.attention.v_proj):
                    p.weight[cols] = 0
    return clean


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("mode", list(MaskMode))
def test_forward_equals_or_differs_as_specified(strategy, mode):
    model = make_model(strategy)
    ids, _ = batch()
    stock = make_model(Strategy.NONE)
    stock.load_state_dict(model.state_dict())
    unmasked = stock(ids)[0]
    model.set_mode(mode)
    out = model(ids)[0]
    changes = strategy != Strategy.NONE and (
        mode == MaskMode.RETAIN or (mode == MaskMode.FORGET and strategy == Strategy.ACTIVATION_MASKING))
    if not changes:
        torch.testing.assert_close(out, unmasked, rtol=0, atol=0)
        return
    assert not torch.allclose(out, unmasked, atol=1e-4)
    side = "forget" if mode == MaskMode.RETAIN else "retain"  # retain mode drops forget units; AM the retain ones
    torch.testing.assert_close(out, zeroed_copy(model, side)(ids)[0], rtol=1e-5, atol=1e-5)


def test_unmasked_layers_are_stock():
    model = make_model(Strategy.SGTM, masked_layers=(1,))
    g = grads(model, MaskMode.FORGET)
    for name, view in SLICES.items():  # block 0 is not masked: everything in it learns
        if name not in ("wte", "wpe"):
            assert torch.count_nonzero(view(g)) > 0, name
    assert torch.count_nonzero(g["transformer.h.1.mlp.c_proj.bias"]) == 0


def test_percent_forget_size_is_per_block_and_rounds_toward_forget():
    wiki = ModelSpec.preset("wiki-254m")
    assert MaskingSpec(forget_param_perc=1).forget_sizes(wiki) == (41, 1)  # 1% of 4096 -> 41 (ceil), of 32 -> 1
    assert MaskingSpec(forget_param_perc=3).forget_sizes(wiki) == (123, 1)
    ts = ModelSpec.preset("ts-64m")
    assert MaskingSpec(forget_param_perc=1).forget_sizes(ts) == (21, 1)  # the paper's note: p=1 -> 21 of 2048
    assert MaskingSpec(forget_param_perc=3).forget_sizes(ts) == (62, 1)
    assert MaskingSpec(forget_param_perc=50).forget_sizes(ts) == (1024, 16)
    assert MaskingSpec().forget_sizes(ts) == (64, 1)
