"""The engine's C kernels against torch: fused small-head attention (vs SDPA) and fused cross-entropy (vs
F.cross_entropy), values and every gradient; the logit workspace's lending rules; the switch and the fallback."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from sgtm_engine.model import cpu_kernels, fused_attention, loss
from sgtm_engine.model.loss import linear_cross_entropy

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler: the kernels cannot be built")


def _sdpa(q, k, v, window, scale):
    """The reference: SDPA over [B, T, H, D] with the same causal / banded mask."""
    T = q.shape[1]
    i = torch.arange(T)
    rel = i[:, None] - i[None, :]
    mask = (rel >= 0) & (rel < window) if window > 0 else rel >= 0
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale)
    return o.transpose(1, 2)


def _qkv_views(base, B, T, H, D):
    """q, k, v as strided [B, T, H, D] views of one [B, T, 3*H*D] tensor, as a fused projection would give."""
    return [t.view(B, T, H, D) for t in base.split(H * D, dim=-1)]


# T not a multiple of 16 or of the row block; windows shorter than T, equal, longer, and 1 (only itself)
CASES = [
    (2, 37, 3, 4, 0, 1.0), (2, 64, 5, 8, 16, 0.5), (1, 1, 2, 4, 0, 1.0), (3, 100, 4, 2, 200, 1.0),
    (2, 70, 2, 3, 7, 0.3), (1, 33, 2, 16, 1, 1.0), (2, 50, 2, 64, 20, 0.125), (1, 17, 1, 1, 0, 2.0),
]


@pytest.mark.parametrize("B,T,H,D,window,scale", CASES)
def test_attention_matches_sdpa_values_and_gradients(B, T, H, D, window, scale):
    torch.manual_seed(0)
    base = torch.randn(B, T, 3 * H * D)
    x1, x2 = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    ours = fused_attention.attention(*_qkv_views(x1, B, T, H, D), window=window, scale=scale)
    ref = _sdpa(*_qkv_views(x2, B, T, H, D), window, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    (ours * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_attention_window_really_cuts_and_threads_do_not_change_the_result():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 40, 4, 4) for _ in range(3))
    full, banded = fused_attention.attention(q, k, v, 0), fused_attention.attention(q, k, v, 8)
    torch.testing.assert_close(full[:, :8], banded[:, :8])  # within the window they agree
    assert not torch.allclose(full[:, 8:], banded[:, 8:], atol=1e-3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_attention.attention(q, k, v, 8)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, banded)  # each (batch, head) is one task: the split never changes a bit


@pytest.mark.parametrize("window", [0, 5])
def test_attention_is_exactly_causal(window):
    """Keys after a query, and before its window, carry exactly zero weight: changing them changes no bit of the
    earlier outputs, and a loss on the earlier outputs gives them exactly zero gradient."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 48, 2, 4) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, 20:] += 10 * torch.randn_like(k2[:, 20:])
    v2[:, 20:] += 10 * torch.randn_like(v2[:, 20:])
    assert torch.equal(fused_attention.attention(q, k, v, window)[:, :20],
                       fused_attention.attention(q, k2, v2, window)[:, :20])
    k.requires_grad_(True)
    v.requires_grad_(True)
    fused_attention.attention(q, k, v, window)[:, :20].sum().backward()
    assert torch.count_nonzero(k.grad[:, 20:]) == 0 and torch.count_nonzero(v.grad[:, 20:]) == 0
    if window:  # the last query row sees only its window: keys before it get nothing from it
        k.grad = v.grad = None
        fused_attention.attention(q, k, v, window)[:, 40:].sum().backward()
        assert torch.count_nonzero(k.grad[:, : 40 - window + 1]) == 0
        assert torch.count_nonzero(v.grad[:, : 40 - window + 1]) == 0


def test_attention_is_used_only_where_it_wins_and_can_be_switched_off():
    q = torch.randn(1, 4, 2, 4)
    assert fused_attention.usable(q)
    assert not fused_attention.usable(torch.randn(1, 4, 2, fused_attention.MAX_HEAD_DIM * 2))
    assert not fused_attention.usable(q.bfloat16())
    cpu_kernels.set_enabled(False)
    try:
        assert not fused_attention.usable(q) and cpu_kernels.library() is None
    finally:
        cpu_kernels.set_enabled(True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,V", [(37, 1003), (64, 50257), (5, 17)])
def test_cross_entropy_matches_torch_values_and_gradients(N, V, bias):
    torch.manual_seed(2)
    h = torch.randn(N, 16, requires_grad=True)
    W = (torch.randn(V, 16) * 0.5).requires_grad_(True)
    b = torch.randn(V, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100
    params = [h, W] + ([b] if bias else [])
    ours = linear_cross_entropy(h, W, b, labels)
    ours.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = F.cross_entropy(F.linear(h, W, b), labels, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, [p.grad for p in params], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cross_entropy_of_an_ablated_target_stays_finite_and_exact():
    """A target with probability ~e^-100 (an ablated model): the loss comes from the log-sum-exp, not log(prob)."""
    h = torch.ones(1, 1)
    W = torch.tensor([[0.0], [100.0]])
    got = linear_cross_entropy(h, W, None, torch.tensor([0]))
    torch.testing.assert_close(got, F.cross_entropy(h @ W.t(), torch.tensor([0])))
    assert 99.9 < got.item() < 100.1


def test_cross_entropy_rejects_a_label_outside_the_vocabulary():
    with pytest.raises(IndexError, match="outside"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(10, 4), None, torch.tensor([3, 10]))


def test_workspace_is_lent_to_one_graph_at_a_time():
    """Two graphs alive at once get separate logit buffers; both backpropagate to the reference gradients."""
    torch.manual_seed(3)
    W = torch.randn(50, 8, requires_grad=True)
    h1, h2 = torch.randn(6, 8), torch.randn(6, 8)
    y1, y2 = torch.randint(0, 50, (6,)), torch.randint(0, 50, (6,))
    a = linear_cross_entropy(h1, W, None, y1)
    b = linear_cross_entropy(h2, W, None, y2)  # a's graph still owns the workspace
    (a + b).backward()
    got = W.grad.clone()
    W.grad = None
    (F.cross_entropy(h1 @ W.t(), y1) + F.cross_entropy(h2 @ W.t(), y2)).backward()
    torch.testing.assert_close(got, W.grad)


def test_workspace_returns_when_a_graph_is_dropped_without_backward():
    W = torch.randn(50, 8, requires_grad=True)
    first = linear_cross_entropy(torch.randn(6, 8), W, None, torch.randint(0, 50, (6,)))
    buffer = loss._workspace._buffer
    del first
    gc.collect()
    second = linear_cross_entropy(torch.randn(6, 8), W, None, torch.randint(0, 50, (6,)))
    assert loss._workspace._buffer is buffer and loss._workspace._owner() is not None  # reused, now owned again
    second.backward()
    assert loss._workspace._owner is None


def test_without_a_compiler_the_model_keeps_torchs_kernels(monkeypatch):
    """A failed build is a logged fallback, never an error: library() answers None and callers use torch."""
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda _: None)
    assert cpu_kernels.library() is None
    assert "no C compiler" in cpu_kernels.unavailable_reason()
    q = torch.randn(1, 4, 2, 4)
    assert not fused_attention.usable(q)
    h, W, y = torch.randn(4, 8, requires_grad=True), torch.randn(20, 8), torch.randint(0, 20, (4,))
    torch.testing.assert_close(linear_cross_entropy(h, W, None, y), F.cross_entropy(h @ W.t(), y))


@pytest.mark.slow
def test_torch_compile_keeps_torchs_kernels_and_agrees_with_eager():
    """Compiled CPU models trace torch's SDPA and cross-entropy (a ctypes call would break the graph); the compiled
    loss and gradients equal the eager ones, which ran on the C kernels."""
    from sgtm_engine.config import ModelSpec
    from sgtm_engine.model.gpt_neo import GPTNeoLM

    torch.manual_seed(4)
    spec = ModelSpec(n_layer=2, d_model=32, n_head=8, context=24, window_size=8, vocab_size=61)
    eager = GPTNeoLM(spec)
    compiled_model = GPTNeoLM(spec)
    compiled_model.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 61, (2, 24))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    want = eager(ids, labels, return_logits=False)[1]
    want.backward()
    got = torch.compile(compiled_model)(ids, labels, return_logits=False)[1]
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["forget", "retain", "default"])
@pytest.mark.parametrize("strategy", ["sgtm", "gradient_routing", "activation_masking", "sgtm_joint_attention"])
def test_every_strategy_and_mode_computes_the_same_with_and_without_the_kernels(strategy, mode):
    """The kernels change speed, not semantics: loss and every parameter gradient of each masked forward (training's
    fused loss path) agree with torch's kernels."""
    from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, Strategy
    from sgtm_engine.model.gpt_neo import GPTNeoLM

    spec = ModelSpec(n_layer=2, d_model=64, n_head=16, context=40, window_size=16, vocab_size=211)
    masking = MaskingSpec(strategy=Strategy(strategy), forget_mlp_dim=32, forget_attn_heads=3)
    torch.manual_seed(6)
    ids = torch.randint(0, 211, (3, 40))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    runs = []
    for on in (True, False):
        torch.manual_seed(7)
        model = GPTNeoLM(spec, masking)
        model.set_mode(MaskMode(mode))
        cpu_kernels.set_enabled(on)
        try:
            loss_value = model(ids, labels, return_logits=False)[1]
            loss_value.backward()
        finally:
            cpu_kernels.set_enabled(True)
        runs.append((loss_value.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_on, grads_on), (loss_off, grads_off) = runs
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-6)
    for name, g in grads_on.items():
        if g is None:
            assert grads_off[name] is None, name
        else:
            torch.testing.assert_close(g, grads_off[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_token_losses_match_cross_entropy_and_argmax(bias):
    """Evaluation's kernel path: per-position loss and top-1 correctness, equal to F.cross_entropy and argmax."""
    torch.manual_seed(8)
    h, W = torch.randn(3, 20, 16), torch.randn(300, 16)
    b = torch.randn(300) if bias else None
    labels = torch.randint(0, 300, (3, 20))
    logits = F.linear(h, W, b)
    labels[0, :4] = logits[0, :4].argmax(-1)  # some positions predicted right
    labels[1, -3:] = -100
    per_position, correct = loss.token_losses(h, W, b, labels)
    want = F.cross_entropy(logits.view(-1, 300), labels.view(-1), ignore_index=-100, reduction="none").view(3, 20)
    torch.testing.assert_close(per_position, want)
    assert torch.equal(correct, (logits.argmax(-1) == labels) & (labels != -100))
    assert correct[0, :4].all() and loss._workspace._owner is None


def test_loss_table_is_the_same_with_and_without_the_kernels(engine_cache):
    from sgtm_engine.config import DataSpec, EvalSpec, ModelSpec
    from sgtm_engine.data.prepare import prepare_data
    from sgtm_engine.evaluate import loss_table
    from sgtm_engine.model.gpt_neo import GPTNeoLM
    from sgtm_engine.runtime import Runtime

    data = prepare_data(DataSpec(corpus="wiki-bilingual", vocab_size=512, max_docs_per_split=60,
                                 test_docs_per_category=3), 32, engine_cache)
    torch.manual_seed(9)
    model = GPTNeoLM(ModelSpec(n_layer=1, d_model=32, n_head=8, context=32), vocab_size=data.vocab_size)
    runtime = Runtime(torch.device("cpu"), "fp32")
    spec = EvalSpec(max_batches=2, batch_size=4)
    with_kernels = loss_table(model, data, spec, runtime)
    cpu_kernels.set_enabled(False)
    try:
        without = loss_table(model, data, spec, runtime)
    finally:
        cpu_kernels.set_enabled(True)
    assert with_kernels.keys() == without.keys() and len(with_kernels) > 6
    for key, value in with_kernels.items():
        assert value == pytest.approx(without[key], rel=1e-5, abs=1e-6), key
