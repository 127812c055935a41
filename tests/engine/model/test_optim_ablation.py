"""Mask-aware AdamW (bit-identical masked coordinates, torch parity elsewhere), legacy behaviour, and ablation."""

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
from sgtm_engine.model.ablation import ablate
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.masking import apply_gradient_masks, region_view
from sgtm_engine.model.optim import build_optimizer, lr_at, step_optimizer
from sgtm_engine.model.partition import Region

SPEC = ModelSpec(n_layer=2, d_model=64, n_head=8, context=16, window_size=8, vocab_size=97)
OPTIM = OptimSpec(lr=1e-2, weight_decay=0.1, warmup_steps=0)


def model_for(strategy=Strategy.SGTM, **kw) -> GPTNeoLM:
    torch.manual_seed(0)
    return GPTNeoLM(SPEC, MaskingSpec(strategy=strategy, forget_mlp_dim=16, forget_attn_heads=2, **kw))


def train_step(model, opt, mode, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context), generator=g)
    model.set_mode(mode)
    opt.zero_grad()
    _, loss = model(ids, torch.roll(ids, -1, 1))
    loss.backward()
    apply_gradient_masks(model, model.partition, mode)
    step_optimizer(opt, model.partition.frozen(mode))
    model.set_mode(MaskMode.DEFAULT)


def frozen_views(model, mode):
    params = dict(model.named_parameters())
    return {n: region_view(params[n], model.partition, n, r).detach().clone()
            for n, r in model.partition.frozen(mode).items()}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("strategy", [Strategy.SGTM, Strategy.GRADIENT_ROUTING, Strategy.ACTIVATION_MASKING])
def test_masked_coordinates_stay_bit_identical_with_weight_decay(strategy, fused):
    model = model_for(strategy, mask_embeddings=True)
    opt = build_optimizer(model, model.partition, dataclasses.replace(OPTIM, fused=fused), OptimizerKind.MASK_AWARE)
    # warm the moments on default steps first, so stale momentum would move a masked coordinate
    for s in range(3):
        train_step(model, opt, MaskMode.DEFAULT, s)
    for mode in (MaskMode.FORGET, MaskMode.RETAIN):
        before = frozen_views(model, mode)
        state_before = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                        for n, p in model.named_parameters() if n in before}
        for s in range(4):
            train_step(model, opt, mode, 10 + s)
        after = frozen_views(model, mode)
        for n in before:
            assert torch.equal(before[n], after[n]), f"{mode}: {n} moved"
        params = dict(model.named_parameters())
        for n, st in state_before.items():
            region = model.partition.frozen(mode)[n]
            for key in ("exp_avg", "exp_avg_sq"):
                old = region_view(st[key], model.partition, n, region)
                new = region_view(opt.state[params[n]][key], model.partition, n, region)
                assert torch.equal(old, new), f"{mode}: {key} of {n} moved"
            steps = {k: v for k, v in opt.state[params[n]].items() if k.startswith("step")}
            frozen_key = "step" if "step" in steps else f"step_{region.value}"
            assert steps[frozen_key] == st[frozen_key], f"{mode}: step count of {n} advanced"


def test_legacy_adamw_moves_masked_coordinates():
    """The paper's single AdamW: zero gradients still move weights through momentum and weight decay."""
    model = model_for()
    opt = build_optimizer(model, model.partition, OPTIM, OptimizerKind.LEGACY)
    train_step(model, opt, MaskMode.DEFAULT, 0)
    before = frozen_views(model, MaskMode.FORGET)
    train_step(model, opt, MaskMode.FORGET, 1)
    after = frozen_views(model, MaskMode.FORGET)
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("strategy", [Strategy.NONE, Strategy.SGTM])
@pytest.mark.parametrize("fused", [True, False])
def test_unmasked_training_matches_torch_adamw(fused, strategy):
    """Fused: the same kernel as torch's fused AdamW, so bitwise; reference: op for op the single-tensor AdamW.
    On default steps a masked model's split tensors (row and column splits) must also match bitwise: while both
    regions share a step count the whole tensor is one update, never a column view through another path."""
    optim = dataclasses.replace(OPTIM, fused=fused)
    ours, ref = model_for(strategy), model_for(strategy)
    opt = build_optimizer(ours, ours.partition, optim, OptimizerKind.MASK_AWARE)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                weight_decay=OPTIM.weight_decay, **({"fused": True} if fused else {"foreach": False}))
    for s in range(5):
        train_step(ours, opt, MaskMode.DEFAULT, s)
        train_step(ref, ref_opt, MaskMode.DEFAULT, s)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        if fused:
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_fused_and_reference_paths_agree_when_regions_have_their_own_step_counts():
    """Mixed modes give split parameters per-region step counts: row slices go through the fused kernel, column
    slices through the single-tensor path; both must land where the reference path lands. Both optimizers get the
    same gradients each step (Adam's first step is ~lr*sign(g), so letting rounding-level differences feed back
    through the forward would flip near-zero gradients and hide what is being compared)."""
    fast, ref = model_for(), model_for()
    fast_opt = build_optimizer(fast, fast.partition, OPTIM, OptimizerKind.MASK_AWARE)
    ref_opt = build_optimizer(ref, ref.partition, dataclasses.replace(OPTIM, fused=False), OptimizerKind.MASK_AWARE)
    for s, mode in enumerate([MaskMode.FORGET, MaskMode.DEFAULT, MaskMode.RETAIN, MaskMode.DEFAULT, MaskMode.FORGET,
                              MaskMode.DEFAULT]):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context), generator=g)
        fast.set_mode(mode)
        fast_opt.zero_grad()
        fast(ids, torch.roll(ids, -1, 1))[1].backward()
        apply_gradient_masks(fast, fast.partition, mode)
        for a, b in zip(fast.parameters(), ref.parameters(), strict=True):
            b.grad = None if a.grad is None else a.grad.clone()
        step_optimizer(fast_opt, fast.partition.frozen(mode))
        step_optimizer(ref_opt, ref.partition.frozen(mode))
    fast.set_mode(MaskMode.DEFAULT)
    for (n, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fast_opt.state[a][key], ref_opt.state[b][key], msg=f"{key} of {n}")
        steps = {k: v for k, v in fast_opt.state[a].items() if k.startswith("step")}
        assert steps == {k: v for k, v in ref_opt.state[b].items() if k.startswith("step")}, n


def test_step_without_frozen_is_plain_adamw():
    """`step()` with no `frozen` (e.g. a caller that treats it as any torch optimizer) freezes nothing: the same
    result as `step(frozen={})`."""
    a, b = model_for(), model_for()
    opts = [build_optimizer(m, m.partition, OPTIM, OptimizerKind.MASK_AWARE) for m in (a, b)]
    ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context), generator=torch.Generator().manual_seed(0))
    for m in (a, b):
        m(ids, torch.roll(ids, -1, 1))[1].backward()
    opts[0].step()
    opts[1].step(frozen={})
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), n


def test_step_with_a_closure_runs_it_and_returns_its_loss():
    """The torch.optim contract: `step(closure)` evaluates the closure (with autograd on, though `step` itself runs
    without) and returns its loss; the update is the one the closure's gradients give."""
    a, b = model_for(), model_for()
    opts = [build_optimizer(m, m.partition, OPTIM, OptimizerKind.MASK_AWARE) for m in (a, b)]
    ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context), generator=torch.Generator().manual_seed(0))

    def closure():
        opts[0].zero_grad()
        loss = a(ids, torch.roll(ids, -1, 1))[1]
        loss.backward()
        return loss

    loss = opts[0].step(closure)
    expected = b(ids, torch.roll(ids, -1, 1))[1]
    expected.backward()
    assert opts[1].step() is None
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), n


def test_split_step_counts_drive_bias_correction_per_region():
    """After forget-only steps the forget region has its own step count; a default step updates both correctly."""
    model = model_for()
    opt = build_optimizer(model, model.partition, OPTIM, OptimizerKind.MASK_AWARE)
    train_step(model, opt, MaskMode.FORGET, 0)
    train_step(model, opt, MaskMode.DEFAULT, 1)
    p = model.transformer.h[0].mlp.c_fc.weight
    assert opt.state[p]["step_forget"] == 2 and opt.state[p]["step_retain"] == 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_each_region_is_exactly_adamw_over_the_steps_it_was_trained_on(fused):
    """A split tensor's regions are independent AdamWs (docs/method.md §6): after forget, default, retain, default
    steps, the forget rows/columns equal torch's AdamW run on the (masked) gradients of the steps that trained them,
    with bias correction counting only those steps, and likewise the retain side."""
    model = model_for()
    opt = build_optimizer(model, model.partition, dataclasses.replace(OPTIM, fused=fused), OptimizerKind.MASK_AWARE)
    params = dict(model.named_parameters())
    names = ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
             "transformer.h.0.attn.attention.q_proj.weight", "transformer.h.1.attn.attention.out_proj.weight")
    start = {n: params[n].detach().clone() for n in names}
    recorded: list[tuple[MaskMode, dict[str, torch.Tensor]]] = []
    for s, mode in enumerate((MaskMode.FORGET, MaskMode.DEFAULT, MaskMode.FORGET, MaskMode.RETAIN, MaskMode.DEFAULT)):
        ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context), generator=torch.Generator().manual_seed(s))
        model.set_mode(mode)
        opt.zero_grad()
        model(ids, torch.roll(ids, -1, 1))[1].backward()
        apply_gradient_masks(model, model.partition, mode)
        recorded.append((mode, {n: params[n].grad.clone() for n in names}))
        step_optimizer(opt, model.partition.frozen(mode))
    model.set_mode(MaskMode.DEFAULT)
    trains = {"retain": (MaskMode.DEFAULT, MaskMode.RETAIN), "forget": (MaskMode.DEFAULT, MaskMode.FORGET)}
    for n in names:
        for side, modes in trains.items():
            region = Region.RETAIN if side == "retain" else Region.FORGET
            view = lambda t, n=n, region=region: region_view(t, model.partition, n, region)  # noqa: E731
            ref = torch.nn.Parameter(view(start[n]).clone())
            ref_opt = torch.optim.AdamW([ref], lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                        weight_decay=OPTIM.weight_decay, foreach=False)
            for mode, g in recorded:
                if mode in modes:
                    ref.grad = view(g[n]).clone()
                    ref_opt.step()
            torch.testing.assert_close(view(params[n]).detach(), ref.detach(), rtol=1e-6, atol=1e-7,
                                       msg=f"{side} region of {n}")
            assert opt.state[params[n]][f"step_{side}"] == sum(m in modes for m, _ in recorded)


def test_parameters_without_a_gradient_are_skipped():
    """As torch's AdamW: a parameter with no gradient this step is neither decayed nor given optimizer state."""
    model = model_for()
    opt = build_optimizer(model, model.partition, OPTIM, OptimizerKind.MASK_AWARE)
    ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context), generator=torch.Generator().manual_seed(0))
    model(ids, torch.roll(ids, -1, 1))[1].backward()
    skipped = {"transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.ln_2.bias"}
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in skipped}
    for n in skipped:
        params[n].grad = None
    step_optimizer(opt, model.partition.frozen(MaskMode.DEFAULT))
    for n in skipped:
        assert torch.equal(params[n], before[n]) and not opt.state[params[n]], n
    assert not torch.equal(params["transformer.h.1.mlp.c_fc.weight"], model_for().transformer.h[1].mlp.c_fc.weight)


def test_optimizer_state_round_trips():
    model = model_for()
    opt = build_optimizer(model, model.partition, OPTIM, OptimizerKind.MASK_AWARE)
    train_step(model, opt, MaskMode.FORGET, 0)
    clone = model_for()
    clone.load_state_dict(model.state_dict())
    opt2 = build_optimizer(clone, clone.partition, OPTIM, OptimizerKind.MASK_AWARE)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint file would: no shared tensors
    train_step(model, opt, MaskMode.RETAIN, 1)
    train_step(clone, opt2, MaskMode.RETAIN, 1)
    for (n, a), (_, b) in zip(model.named_parameters(), clone.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_lr_schedule_warmup_then_cosine():
    spec = OptimSpec(lr=1.0, warmup_steps=10, warmup_start=0.1)
    assert lr_at(0, spec, 110) == pytest.approx(0.1)
    assert lr_at(10, spec, 110) == pytest.approx(1.0)
    assert lr_at(60, spec, 110) == pytest.approx(0.5)
    assert lr_at(110, spec, 110) == pytest.approx(0.0, abs=1e-12)


# --- ablation ---------------------------------------------------------------------------------------------------------

def test_zero_ablation_zeroes_forget_slice_and_unit_gets_zero_gradient():
    model = model_for()
    ablate(model, AblateSpec(kind=AblationKind.ZERO))
    blk = model.transformer.h[0]
    r = SPEC.mlp_dim - 16
    assert torch.count_nonzero(blk.mlp.c_fc.weight[r:]) == 0 and torch.count_nonzero(blk.mlp.c_fc.bias[r:]) == 0
    assert torch.count_nonzero(blk.mlp.c_proj.weight[:, r:]) == 0
    assert torch.count_nonzero(blk.mlp.c_fc.weight[:r]) > 0
    # a zero-ablated unit is a stationary point: plain training gives it exactly zero gradient
    model.zero_grad()
    ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context))
    model(ids, torch.roll(ids, -1, 1))[1].backward()
    for i in range(SPEC.n_layer):
        b = model.transformer.h[i]
        assert torch.count_nonzero(b.mlp.c_fc.weight.grad[r:]) == 0
        assert torch.count_nonzero(b.mlp.c_fc.bias.grad[r:]) == 0
        assert torch.count_nonzero(b.mlp.c_proj.weight.grad[:, r:]) == 0
        c = (SPEC.n_head - 2) * SPEC.head_dim
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert torch.count_nonzero(getattr(b.attn.attention, proj).weight.grad[c:]) == 0
        assert torch.count_nonzero(b.attn.attention.out_proj.weight.grad[:, c:]) == 0


def test_ablation_matches_retain_mode_forward():
    """Zero-ablating θ_forget is what retain mode computes on the fly."""
    model = model_for()
    ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context))
    model.set_mode(MaskMode.RETAIN)
    retain_out = model(ids)[0]
    model.set_mode(MaskMode.DEFAULT)
    ablate(model, AblateSpec())
    torch.testing.assert_close(model(ids)[0], retain_out, rtol=1e-5, atol=1e-5)


def test_reinit_ablation_is_seeded_and_has_the_retain_slice_std():
    a, b, c = model_for(), model_for(), model_for()
    with torch.no_grad():  # give the retain slice a distinctive scale
        for m in (a, b, c):
            m.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    used = ablate(a, AblateSpec(kind=AblationKind.REINIT, seed=7))
    ablate(b, AblateSpec(kind=AblationKind.REINIT, seed=7))
    ablate(c, AblateSpec(kind=AblationKind.REINIT, seed=8))
    r = SPEC.mlp_dim - 16
    wa, wb, wc = (m.transformer.h[0].mlp.c_fc.weight.detach() for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa[r:], wc[r:])
    retain_std = float(wa[:r].std())
    assert used["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(retain_std)
    assert float(wa[r:].std()) == pytest.approx(retain_std, rel=0.1)


# θ_forget as zero-ablation removes it, per strategy (docs/method.md §9), written out independently of the partition:
# the in-rows and in-biases always (q/k/v only when attention is partitioned); the down-projection columns only where
# the down-projection is partitioned and the strategy is not gradient routing.
_IN = ("c_fc", "q", "k", "v")
ABLATED = {
    Strategy.NONE: (),
    Strategy.SGTM: (*_IN, "c_proj", "out_proj"),
    Strategy.ACTIVATION_MASKING: (*_IN, "c_proj", "out_proj"),
    Strategy.GRADIENT_ROUTING: _IN,
    Strategy.SGTM_JOINT_PROJECTION: _IN,
    Strategy.SGTM_JOINT_MLP_PROJECTION: (*_IN, "out_proj"),
    Strategy.SGTM_JOINT_ATTN_PROJECTION: (*_IN, "c_proj"),
    Strategy.SGTM_JOINT_ATTENTION: ("c_fc",),
}


_KIND = {"mlp.c_fc.weight": "c_fc", "mlp.c_fc.bias": "c_fc", "mlp.c_proj.weight": "c_proj",
         "attn.attention.q_proj.weight": "q", "attn.attention.k_proj.weight": "k", "attn.attention.v_proj.weight": "v",
         "attn.attention.out_proj.weight": "out_proj"}


def _parts(kind: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(retain, forget) views of a block tensor as §3's table splits it (model_for's 16 units, 2 heads): in-rows
    of c_fc (and its bias) and q/k/v, columns of the down-projections."""
    split = SPEC.mlp_dim - 16 if kind in ("c_fc", "c_proj") else (SPEC.n_head - 2) * SPEC.head_dim
    if kind in ("c_proj", "out_proj"):
        return t[:, :split], t[:, split:]
    return t[:split], t[split:]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_zero_ablation_zeroes_exactly_the_documented_slices(strategy):
    """Per strategy, zero-ablation sets exactly θ_forget's ablated slices to 0 and leaves every other coordinate
    (retain slices, down-projection biases, LayerNorms, embeddings, kept columns) bit-identical."""
    model = model_for(strategy)
    with torch.no_grad():  # non-zero biases and LayerNorms, so "untouched" and "zeroed" are distinguishable
        for n, p in model.named_parameters():
            if "bias" in n or "ln" in n:
                p.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    used = ablate(model, AblateSpec(kind=AblationKind.ZERO))
    ablated = set()
    for n, p in model.named_parameters():
        expected = before[n]
        kind = _KIND.get(n.split(".", 3)[-1]) if n.startswith("transformer.h.") else None
        if kind in ABLATED[strategy]:
            _parts(kind, expected)[1].zero_()
            ablated.add(n)
        assert torch.equal(p.detach(), expected), n
    assert used == dict.fromkeys(ablated, 0.0)  # zero-ablation records sigma 0.0 for every ablated tensor


def test_reinit_ablation_takes_sigma_from_the_retain_slice_only():
    """σ is the std of the matching retain slice of the same tensor (docs/method.md §9), not of the forget slice
    or of the whole tensor: scale only the retain rows/columns and σ (and the re-drawn slice) must follow them."""
    model = model_for()
    params = dict(model.transformer.h[0].named_parameters())
    # tensor -> its (retain view, forget view)
    split = {k: (lambda t, kind=_KIND[k]: _parts(kind, t)) for k in (
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "attn.attention.q_proj.weight",
        "attn.attention.out_proj.weight")}
    with torch.no_grad():
        params["mlp.c_fc.bias"].normal_(0.0, 0.5)
        for scale, (k, views) in zip((10.0, 1.0, 5.0, 8.0, 4.0), split.items(), strict=True):
            retain, forget = views(params[k])
            retain.mul_(scale)
            forget.fill_(100.0)  # far from the retain entries: neither its std nor the tensor's may be used
    retain_before = {k: views(params[k])[0].detach().clone() for k, views in split.items()}
    used = ablate(model, AblateSpec(kind=AblationKind.REINIT, seed=3))
    for k, views in split.items():
        retain, forget = (v.detach() for v in views(params[k]))
        sigma = float(retain_before[k].std())
        assert used[f"transformer.h.0.{k}"] == pytest.approx(sigma), k
        assert float(forget.std()) == pytest.approx(sigma, rel=0.4), k  # drawn at that scale (16 bias entries: loose)
        assert float(forget.mean().abs()) < sigma, k  # centred at 0, not at the old forget values
        torch.testing.assert_close(retain, retain_before[k], rtol=0, atol=0)  # the retain slice is untouched


@pytest.mark.parametrize("retain_units", [1, 2])
def test_reinit_ablation_with_a_one_or_two_unit_retain_slice(retain_units):
    """A retain slice of one entry has no std: σ is 0 and the re-drawn slice is 0, never NaN. With two entries σ is
    their (unbiased) std."""
    spec = dataclasses.replace(SPEC, d_mlp=8)
    torch.manual_seed(0)
    model = GPTNeoLM(spec, MaskingSpec(forget_mlp_dim=8 - retain_units, forget_attn_heads=2))
    bias = model.transformer.h[0].mlp.c_fc.bias
    with torch.no_grad():
        bias.copy_(torch.arange(8.0) + 1.0)
    expected = 0.0 if retain_units == 1 else float(torch.tensor([1.0, 2.0]).std())
    used = ablate(model, AblateSpec(kind=AblationKind.REINIT, seed=0))
    assert used["transformer.h.0.mlp.c_fc.bias"] == pytest.approx(expected)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    if retain_units == 1:
        assert torch.count_nonzero(bias[1:]) == 0
    torch.testing.assert_close(bias[:retain_units], torch.arange(retain_units, dtype=torch.float32) + 1.0)
