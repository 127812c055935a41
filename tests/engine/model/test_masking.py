"""Every strategy x mode x parameter slice: which gradients are exactly zero, which are not, and the forward.

The expected tables below are written out from docs/method.md §5 (paper App. F) independently of the partition
code, so a broken rule in `Partition` (say, forgetting the c_proj bias) fails here; `test_a_broken_rule_is_caught`
proves it.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sgtm_engine.config import (
    AblateSpec,
    AblationKind,
    MaskingSpec,
    MaskMode,
    ModelSpec,
    OptimizerKind,
    OptimSpec,
    Strategy,
)
from sgtm_engine.errors import ConfigError
from sgtm_engine.model.ablation import ablate
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.masking import apply_gradient_masks, region_view
from sgtm_engine.model.optim import build_optimizer, step_optimizer
from sgtm_engine.model.partition import Partition, Region

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


# --- the partition table itself ---------------------------------------------------------------------------------------

D, HD = SPEC.d_model, SPEC.head_dim
MLP_SPLITS = {"mlp.c_fc.weight": (0, R_MLP, SPEC.mlp_dim), "mlp.c_fc.bias": (0, R_MLP, SPEC.mlp_dim),
              "mlp.c_proj.weight": (1, R_MLP, SPEC.mlp_dim)}
ATTN_SPLITS = {**{f"attn.attention.{p}_proj.weight": (0, R_COL, D) for p in "qkv"},
               "attn.attention.out_proj.weight": (1, R_COL, D)}


@pytest.mark.parametrize("heads", [F_HEADS, 1, 0], ids=["2-heads", "1-head", "no-forget-heads"])
@pytest.mark.parametrize("strategy", list(Strategy))
def test_partition_splits_exactly_the_documented_tensors(strategy, heads):
    """docs/method.md §3: each masked block splits c_fc (rows), its bias, c_proj (columns) and, when attention is
    partitioned, q/k/v (rows) and out_proj (columns), forget = the tail; nothing else is split. Attention is not
    partitioned for sgtm_joint_attention nor when forget_attn_heads is 0 (§5, last line)."""
    part = Partition(SPEC, MaskingSpec(strategy=strategy, forget_mlp_dim=F_MLP, forget_attn_heads=heads,
                                       masked_layers=(1,)))
    expected = {}
    if strategy != Strategy.NONE:
        expected.update(MLP_SPLITS)
        if heads and strategy != Strategy.SGTM_JOINT_ATTENTION:
            expected.update({k: (dim, (SPEC.n_head - heads) * HD, size) for k, (dim, _, size) in ATTN_SPLITS.items()})
    got = {name: (s.dim, s.split, s.size) for name, s in part.slices.items()}
    assert got == {f"transformer.h.1.{k}": v for k, v in expected.items()}
    for name, (_, split, size) in got.items():  # regions: retain = the head [0, split), forget = the tail
        sl = part.slice_of(name)
        assert (sl.bounds(Region.RETAIN), sl.bounds(Region.FORGET), sl.bounds(Region.ALL)) == \
            ((0, split), (split, size), (0, size))
    assert part.slice_of("transformer.h.0.mlp.c_fc.weight") is None  # block 0 is not masked
    with_two = Partition(SPEC, MaskingSpec(strategy=strategy, forget_mlp_dim=F_MLP, forget_attn_heads=F_HEADS,
                                           masked_layers=(1,)))
    for mode in MaskMode:
        if not heads or strategy == Strategy.SGTM_JOINT_ATTENTION:  # no step freezes any attention coordinate
            assert not [n for n in part.frozen(mode) if ".attn." in n], mode
        else:  # what a step freezes does not depend on how many heads (> 0) are forget
            assert part.frozen(mode) == with_two.frozen(mode), mode


@pytest.mark.parametrize("strategy", [s for s in Strategy if s != Strategy.NONE])
def test_no_forget_heads_leaves_attention_joint(strategy):
    """forget_attn_heads = 0: attention is not partitioned in any strategy (docs/method.md §5), so retain and
    forget steps give every attention parameter its true (stock) gradient, and ablation leaves attention alone."""
    torch.manual_seed(0)
    model = GPTNeoLM(SPEC, MaskingSpec(strategy=strategy, forget_mlp_dim=F_MLP, forget_attn_heads=0))
    attn = [n for n, _ in model.named_parameters() if ".attn." in n]
    stock = grads(model, MaskMode.DEFAULT)
    for mode in (MaskMode.RETAIN, MaskMode.FORGET):
        g = grads(model, mode)
        for n in attn:
            assert torch.count_nonzero(g[n]) > 0, f"{mode}: {n} should learn"
            if mode == MaskMode.FORGET and strategy in (Strategy.SGTM, Strategy.SGTM_JOINT_PROJECTION):
                torch.testing.assert_close(g[n], stock[n], rtol=0, atol=0)  # stock forward, no surgery on attention
    assert not [n for n, _ in model.partition.ablation_targets() if ".attn." in n]


def test_partition_summary_names_the_slice():
    """`describe()` goes into logs and result files: strategy, masked blocks, forget sizes and the forget-step set;
    a clean model has no slice at all, whatever sizes its masking spec names."""
    clean = MaskingSpec(strategy=Strategy.NONE, forget_mlp_dim=F_MLP, forget_attn_heads=F_HEADS)
    assert Partition(SPEC, clean).describe() == {
        "strategy": "none", "masked_layers": [], "forget_mlp_units_per_block": 0, "forget_heads_per_block": 0,
        "frozen_on_forget_steps": []}
    masking = MaskingSpec(strategy=Strategy.SGTM, forget_mlp_dim=F_MLP, forget_attn_heads=F_HEADS, masked_layers=(1,))
    summary = Partition(SPEC, masking).describe()
    assert summary == {
        "strategy": "sgtm", "masked_layers": [1], "forget_mlp_units_per_block": F_MLP,
        "forget_heads_per_block": F_HEADS,
        "frozen_on_forget_steps": sorted(f"transformer.h.1.{k}" for k in [
            *MLP_SPLITS, "mlp.c_proj.bias", *ATTN_SPLITS, "attn.attention.out_proj.bias"]),
    }


def test_region_view_refuses_a_region_of_an_unsplit_tensor():
    """Asking for the retain/forget part of a tensor the partition does not split is an error, never a guess."""
    model = make_model(Strategy.SGTM)
    params = dict(model.named_parameters())
    for name in ("transformer.wte.weight", "transformer.h.0.mlp.c_proj.bias", "transformer.h.0.ln_1.weight"):
        assert region_view(params[name], model.partition, name, Region.ALL) is params[name]
        for region in (Region.RETAIN, Region.FORGET):
            with pytest.raises(KeyError, match="not split"):
                region_view(params[name], model.partition, name, region)


def test_gradient_masks_skip_parameters_without_a_gradient():
    """Surgery on a parameter that got no gradient (never used, or grads set to None) is a no-op, not an error,
    and the others are still masked."""
    model = make_model(Strategy.SGTM, mask_embeddings=True)
    g = grads(model, MaskMode.DEFAULT, surgery=False)
    model.zero_grad(set_to_none=True)
    apply_gradient_masks(model, model.partition, MaskMode.FORGET)
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():  # only some parameters have a gradient
        if ".h.0." in name or name == "transformer.wte.weight":
            p.grad = g[name].clone()
    apply_gradient_masks(model, model.partition, MaskMode.FORGET)
    params = dict(model.named_parameters())
    assert params["transformer.wpe.weight"].grad is None and params["transformer.h.1.mlp.c_fc.weight"].grad is None
    masked = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert torch.count_nonzero(masked["transformer.wte.weight"]) == 0
    assert torch.count_nonzero(SLICES["c_fc.retain_rows"](masked)) == 0
    torch.testing.assert_close(SLICES["c_fc.forget_rows"](masked), SLICES["c_fc.forget_rows"](g), rtol=0, atol=0)


@pytest.mark.parametrize("mode", [MaskMode.RETAIN, MaskMode.FORGET])
@pytest.mark.parametrize("strategy", list(Strategy))
def test_mask_aware_adamw_freezes_every_documented_zero_slice(strategy, mode):
    """docs/method.md §5-§6: every coordinate the table above says gets zero gradient (structurally or by surgery)
    is frozen, i.e. bit-identical after mask-aware AdamW steps with weight decay and warm momentum; every other
    slice moves. Checked against the hand-written table, not against `Partition.frozen`, so a structural zero the
    partition forgets to list (retain mode, activation masking) is caught: weight decay would shrink it."""
    model = make_model(strategy, mask_embeddings=True)
    opt = build_optimizer(model, model.partition, OptimSpec(lr=1e-2, weight_decay=0.1, warmup_steps=0),
                          OptimizerKind.MASK_AWARE)

    def step(m: MaskMode) -> None:
        opt.zero_grad()
        model.set_mode(m)
        ids, labels = batch()
        model(ids, labels)[1].backward()
        apply_gradient_masks(model, model.partition, m)
        step_optimizer(opt, model.partition.frozen(m))
        model.set_mode(MaskMode.DEFAULT)

    for _ in range(2):  # warm the moments, so stale momentum would move a frozen coordinate
        step(MaskMode.DEFAULT)
    with torch.no_grad():
        before = {n: p.clone() for n, p in model.named_parameters()}
    for _ in range(2):
        step(mode)
    after = dict(model.named_parameters())
    frozen = expected_zero(strategy, mode, mask_embeddings=True)
    for name, view in SLICES.items():
        moved = not torch.equal(view(before), view(after).detach())
        assert moved != (name in frozen), f"{strategy}/{mode}: {name} {'moved' if moved else 'did not move'}"


@pytest.mark.parametrize("n_layer", [1, 2])
def test_set_mode_sets_every_block(n_layer):
    """`set_mode` puts every block in one mode (the forward reads the mode per block) and accepts the config's
    string form; the output then is that mode's, whichever mode came before."""
    model = GPTNeoLM(dataclasses.replace(SPEC, n_layer=n_layer), MaskingSpec(forget_mlp_dim=F_MLP,
                                                                               forget_attn_heads=F_HEADS))
    ids, _ = batch()
    model.set_mode("retain")
    assert [b.mode for b in model.transformer.h] == [MaskMode.RETAIN] * n_layer
    retain_out = model(ids)[0]
    model.set_mode(MaskMode.FORGET)
    assert [b.mode for b in model.transformer.h] == [MaskMode.FORGET] * n_layer
    forget_out = model(ids)[0]
    assert not torch.equal(forget_out, retain_out)  # the mode reached the forward
    model.set_mode(MaskMode.RETAIN)
    torch.testing.assert_close(model(ids)[0], retain_out, rtol=0, atol=0)


def test_a_partition_refuses_a_masking_spec_that_does_not_fit_the_model():
    """A model built directly (a notebook, not a stage spec) gets the same check as a stage: a masked block the model
    does not have is a ConfigError naming the field, not a KeyError at the first masked step."""
    with pytest.raises(ConfigError, match=r"masking\.masked_layers=\[5\]: out of range for n_layer=2"):
        GPTNeoLM(SPEC, MaskingSpec(strategy=Strategy.SGTM, forget_mlp_dim=F_MLP, masked_layers=(1, 5)))
    with pytest.raises(ConfigError, match="forget_mlp_dim"):
        Partition(SPEC, MaskingSpec(strategy=Strategy.SGTM, forget_mlp_dim=SPEC.mlp_dim))


def test_no_forget_mlp_units_leaves_the_mlp_all_retain():
    """forget_mlp_dim = 0 (docs/method.md §3): every MLP unit is retain, so under sgtm a forget step leaves the whole
    MLP of a masked block without gradient while the forget heads learn, and a retain step trains the MLP; ablation
    touches attention only. (forget_attn_heads = 0 instead leaves attention joint: the test above.)"""
    torch.manual_seed(0)
    model = GPTNeoLM(SPEC, MaskingSpec(strategy=Strategy.SGTM, forget_mlp_dim=0, forget_attn_heads=F_HEADS))
    mlp = [n for n, _ in model.named_parameters() if ".mlp." in n]
    forget, retain = grads(model, MaskMode.FORGET), grads(model, MaskMode.RETAIN)
    for n in mlp:
        assert torch.count_nonzero(forget[n]) == 0, f"{n} should be frozen on a forget step"
        assert torch.count_nonzero(retain[n]) > 0, f"{n} should learn on a retain step"
    assert torch.count_nonzero(_rows("q", slice(R_COL, None))(forget)) > 0  # the forget heads learn
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ablate(model, AblateSpec(kind=AblationKind.ZERO))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn." in n for n in changed), changed


@pytest.mark.slow
def test_a_compiled_training_step_masks_exactly_as_the_eager_one():
    """`runtime.compile`: through torch.compile (a graph per mode: the retain step computes fewer units), an SGTM
    step's masked gradients equal the eager step's to float rounding, and every slice the table says is zero is
    exactly zero, in both modes."""
    from torch._dynamo.utils import counters

    from sgtm_engine.runtime import Runtime
    from sgtm_engine.steps import optimizer_step

    def masked_grads(compiled: bool, mode: MaskMode) -> dict[str, torch.Tensor]:
        model = make_model(Strategy.SGTM, mask_embeddings=True)
        runtime = Runtime(torch.device("cpu"), "fp32", compile=compiled)
        opt = build_optimizer(model, model.partition, OptimSpec(lr=1e-3, warmup_steps=0), OptimizerKind.MASK_AWARE)
        optimizer_step(runtime.training_net(model), model, opt, *batch(), mode, runtime, micro_batch_size=2)
        return {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}

    counters.clear()
    for mode in (MaskMode.FORGET, MaskMode.RETAIN):
        eager, compiled = masked_grads(False, mode), masked_grads(True, mode)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
        zero = expected_zero(Strategy.SGTM, mode, mask_embeddings=True)
        for name, view in SLICES.items():
            assert (torch.count_nonzero(view(compiled)) == 0) == (name in zero), f"{mode}: {name}"
    assert counters["stats"]["unique_graphs"] >= 2  # it did compile: a graph per mode
