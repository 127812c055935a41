"""Our GPTNeoLM against stock transformers.GPTNeoForCausalLM: same weights -> same logits, loss and gradients."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from sgtm_engine.config import MaskingSpec, ModelSpec, Strategy
from sgtm_engine.model import gpt_neo
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.hf import from_hf_model, load_hf, save_hf, to_hf_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# context 40 > window 8: the local layers must really slide; 3 layers = global, local, global
SPEC = ModelSpec(n_layer=3, d_model=64, n_head=8, context=40, window_size=8, vocab_size=101, output_bias=False)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    ours = GPTNeoLM(SPEC)
    with torch.no_grad():  # make biases and LayerNorms non-trivial so their gradients and effects are tested
        for name, p in ours.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return ours, to_hf_model(ours).eval()


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Our labels are aligned to positions; HF shifts internally. Same targets, last position ignored."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["one head chunk", "head chunks of 7 rows"])
def test_logits_loss_and_every_gradient_match_stock_gpt_neo(monkeypatch, chunk_rows):
    """With labels the loss runs the output head over row chunks: 3 x 40 positions in chunks of 7 rows end in a ragged
    chunk of 1 row, and the last two chunks have no target at all."""
    if chunk_rows is not None:
        monkeypatch.setitem(gpt_neo.HEAD_CHUNK_LOGITS, "cpu", chunk_rows * SPEC.vocab_size)
    ours, hf = _pair()
    ids = torch.randint(0, SPEC.vocab_size, (3, SPEC.context))
    labels = _labels(ids)
    labels[2, -8:] = -100  # rows 112..119: chunks 16 (7 rows) and 17 (1 row)
    if chunk_rows is not None:
        assert len(list(ours.head_chunks(ours.hidden_states(ids), labels))) == 18
    logits, none = ours(ids)
    nothing, loss = ours(ids, labels)
    assert none is None and nothing is None
    out = hf(input_ids=ids, labels=labels.roll(1, dims=1))  # HF shifts: its labels[t + 1] is our labels[t]
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    out.loss.backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
        checked += 1
    assert checked == len(hf_params)


def test_the_head_chunk_size_is_chosen_by_device_type(monkeypatch):
    ours, _ = _pair()
    ids = torch.randint(0, SPEC.vocab_size, (3, SPEC.context))
    hidden, labels = ours.hidden_states(ids), _labels(ids)
    monkeypatch.setitem(gpt_neo.HEAD_CHUNK_LOGITS, "cpu", 7 * SPEC.vocab_size)
    monkeypatch.setattr(gpt_neo, "HEAD_CHUNK_LOGITS_ELSEWHERE", 40 * SPEC.vocab_size)
    assert [len(y) for _, y in ours.head_chunks(hidden, labels)] == [7] * 17 + [1]
    monkeypatch.delitem(gpt_neo.HEAD_CHUNK_LOGITS, "cpu")  # a device type without its own entry
    assert [len(y) for _, y in ours.head_chunks(hidden, labels)] == [40] * 3


def test_local_layers_differ_from_global_beyond_the_window():
    """Guards the parity test: if the window were ignored, a local layer would equal a global one."""
    ours, _ = _pair()
    ids = torch.randint(0, SPEC.vocab_size, (1, SPEC.context))
    all_global = GPTNeoLM(ModelSpec(**{**SPEC.__dict__, "attention_layers": ("global",) * 3}))
    all_global.load_state_dict(ours.state_dict())
    short, long_ = ids[:, : SPEC.window_size], ids
    torch.testing.assert_close(ours(short)[0], all_global(short)[0])  # within the window they agree
    assert not torch.allclose(ours(long_)[0], all_global(long_)[0], atol=1e-4)


def test_checkpoint_round_trips_through_stock_transformers(tmp_path):
    ours, _ = _pair(1)
    save_hf(ours, tmp_path / "ours")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, SPEC.vocab_size, (2, SPEC.context))
    torch.testing.assert_close(stock(input_ids=ids).logits, ours(ids)[0], rtol=1e-5, atol=1e-5)

    stock.save_pretrained(tmp_path / "stock")
    back = load_hf(tmp_path / "stock")
    torch.testing.assert_close(back(ids)[0], ours(ids)[0], rtol=1e-5, atol=1e-5)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_a_model_without_a_tokenizer_names_no_special_tokens_outside_its_vocabulary(tmp_path):
    """GPT-Neo's config defaults bos/eos to GPT-2's 50256; a 101-token model must not claim it (transformers warns,
    and `generate` would wait for a token the model cannot emit)."""
    ours, hf = _pair()
    assert hf.config.bos_token_id is None and hf.config.eos_token_id is None
    save_hf(ours, tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert stock.config.bos_token_id is None and stock.config.eos_token_id is None
    save_hf(ours, tmp_path / "with_eos", eos_token_id=7)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "with_eos").config.eos_token_id == 7


def test_output_bias_and_masking_spec_survive_our_round_trip(tmp_path):
    spec = ModelSpec(**{**SPEC.__dict__, "output_bias": True})
    masking = MaskingSpec(strategy=Strategy.SGTM, forget_mlp_dim=16, forget_attn_heads=2)
    model = GPTNeoLM(spec, masking)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    save_hf(model, tmp_path)
    back = load_hf(tmp_path)
    assert back.masking == masking and back.spec.output_bias
    ids = torch.randint(0, spec.vocab_size, (1, 12))
    torch.testing.assert_close(back(ids)[0], model(ids)[0], rtol=0, atol=0)
    # stock transformers drops the bias it cannot hold: logits differ by exactly that per-vocabulary constant
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(stock(input_ids=ids).logits + model.lm_head.bias, model(ids)[0], rtol=1e-5, atol=1e-5)


def test_from_hf_model_matches():
    ours, hf = _pair(2)
    again = from_hf_model(hf)
    ids = torch.randint(0, SPEC.vocab_size, (2, 20))
    torch.testing.assert_close(again(ids)[0], hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["ts-8m", "wiki-254m"])
def test_presets_have_the_papers_parameter_counts(preset):
    expected = {"ts-8m": 7_736_000, "wiki-254m": 254_054_000}[preset]
    assert abs(ModelSpec.preset(preset).n_params() - expected) < 1_000
