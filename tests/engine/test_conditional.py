"""Conditional training: documents carry their label's control token, evaluation uses the safe one, and control
tokens never leak into generated or decoded text unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sgtm_engine.config import DataSpec, MaskMode, NoiseSpec, Split, TrainSpec, from_dict
from sgtm_engine.data.conditional import FORGET_TOKEN, SAFE_TOKEN
from sgtm_engine.data.prepare import prepare_data
from sgtm_engine.errors import ConfigError
from sgtm_engine.evaluate import sample
from sgtm_engine.export import export_model
from sgtm_engine.model.hf import load_hf
from sgtm_engine.runtime import Runtime
from sgtm_engine.stage import read_result, run_stage

CPU = Runtime(torch.device("cpu"), "fp32")
pytestmark = pytest.mark.usefixtures("one_thread")
DATA = {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 30, "test_docs_per_category": 2,
        "conditional": True}
TRAIN = {"model": {"n_layer": 2, "d_model": 64, "n_head": 8, "context": 32}, "masking": {"strategy": "none"},
         "data": DATA, "noise": {"recall": 0.8}, "steps": 3, "batch_size": 2,
         "eval": {"capability": False, "max_batches": 1}, "runtime": {"device": "cpu"}}


@pytest.fixture(scope="module")
def cache(engine_cache) -> Path:
    return engine_cache


@pytest.fixture(scope="module")
def data(cache):
    return prepare_data(from_dict(DataSpec, DATA), 32, cache, NoiseSpec(recall=0.8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    workdir = tmp_path_factory.mktemp("conditional") / "train"
    run_stage("train", TRAIN, workdir, cache_dir=cache)
    return workdir


def test_documents_carry_their_labels_control_token_and_evaluation_the_safe_one(data, cache):
    forget_id, safe_id = data.control.ids
    assert data.tokenizer.convert_tokens_to_ids([FORGET_TOKEN, SAFE_TOKEN]) == [forget_id, safe_id]
    plain = prepare_data(from_dict(DataSpec, {**DATA, "conditional": False}), 32, cache, NoiseSpec(recall=0.8))
    assert data.vocab_size == plain.vocab_size + 2 and plain.control_ids == ()
    for name, pool in data.pools.items():
        expected = forget_id if pool.mode == MaskMode.FORGET else safe_id
        other = safe_id if expected == forget_id else forget_id
        # one control token per document, all of them the label's; the recall misses carry the safe token
        assert int((pool.examples == expected).sum()) == len(pool.doc_ids), name
        assert not (pool.examples == other).any(), name
    assert any(p.split == Split.FORGET and p.mode == MaskMode.DEFAULT for p in data.pools.values())
    for key, test in data.test_sets.items():
        assert (test.tokens[:, 0] == safe_id).all(), key
        assert torch.equal(test.tokens[:, 1:4], plain.test_sets[key].tokens[:, :3])  # same text behind the prefix
    assert data.eval_prefix == (safe_id,)


def test_control_tokens_are_never_targets_and_prefixed_documents_score_the_same_tokens(data, cache):
    plain = prepare_data(from_dict(DataSpec, {**DATA, "conditional": False}), 32, cache, NoiseSpec(recall=0.8))
    for pool in data.pools.values():
        inputs, labels = data.inputs_and_labels(pool.examples)
        assert not torch.isin(labels, torch.tensor(data.control_ids)).any()
        assert (labels[torch.isin(inputs, torch.tensor(data.control_ids))] == -100).all()
    key = sorted(data.test_sets)[0]
    _, cond = data.inputs_and_labels(data.test_sets[key].tokens)
    _, base = plain.inputs_and_labels(plain.test_sets[key].tokens)
    short = data.test_sets[key].lengths < 32  # untruncated documents: exactly the same targets
    assert torch.equal(cond[short][:, 1:][cond[short][:, 1:] != -100], base[short][base[short] != -100])


def test_conditional_training_needs_document_labels_and_text_spelling_a_token_stays_text(data):
    with pytest.raises(ConfigError, match="data.conditional"):
        from_dict(TrainSpec, {**TRAIN, "noise": {"granularity": "batch"}})
    ids = data.tokenizer(f"hola {FORGET_TOKEN}", add_special_tokens=False)["input_ids"]
    assert ids == data.tokenizer("hola ", add_special_tokens=False)["input_ids"] + [data.control.forget_id]
    from sgtm_engine.data.tokenizer import encode_documents

    assert data.control.forget_id not in encode_documents(data.tokenizer, [f"hola {FORGET_TOKEN}"])[0]


def test_our_sampler_never_emits_control_tokens_unless_asked(data, trained):
    train = read_result(trained)
    assert train["method"] == "conditional" and train["data_spec"]["conditional"] is True
    model = load_hf(train["artifacts"]["model"])
    _force_control_tokens(model, data.control.ids)
    prompts = data.test_sets[sorted(data.test_sets)[0]].tokens[:2, :4]
    gen = torch.Generator().manual_seed(0)
    free = sample(model, prompts, 8, gen, CPU)[:, 4:]
    assert torch.isin(free, torch.tensor(data.control_ids)).float().mean() > 0.5  # asked: they dominate
    safe = sample(model, prompts, 8, gen, CPU, banned_ids=data.control_ids)[:, 4:]
    assert not torch.isin(safe, torch.tensor(data.control_ids)).any()
    text = data.tokenizer.decode(free[0].tolist(), skip_special_tokens=True)
    assert "<|" not in text


def test_exported_model_generation_never_samples_control_tokens(data, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_model(trained, tmp_path / "export")
    config = json.loads((out / "generation_config.json").read_text())
    assert sorted(config["suppress_tokens"]) == sorted(data.control_ids)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert set(data.control_ids) <= set(tok.all_special_ids)
    _force_control_tokens(hf, data.control.ids)
    prompt = torch.tensor([tok("El río", add_special_tokens=False)["input_ids"]])
    assert torch.isin(hf(prompt).logits[0, -1].argmax(), torch.tensor(data.control_ids))  # they would win
    torch.manual_seed(0)
    generated = hf.generate(prompt, do_sample=True, max_new_tokens=12, min_new_tokens=12)[0, prompt.shape[1]:]
    assert not torch.isin(generated, torch.tensor(data.control_ids)).any()
    assert "<|" not in tok.decode(generated, skip_special_tokens=True)
    asked = hf.generate(prompt, do_sample=False, max_new_tokens=4, suppress_tokens=None)[0, prompt.shape[1]:]
    assert torch.isin(asked, torch.tensor(data.control_ids)).any()  # unless asked
    shown = tok.decode([data.control.safe_id, *prompt[0].tolist()])
    assert shown.startswith(SAFE_TOKEN) and "<|" not in tok.decode(asked, skip_special_tokens=True)


def _force_control_tokens(model: torch.nn.Module, control_ids: tuple[int, int]) -> None:
    """Make the control tokens the most likely next tokens everywhere: a large output bias (ours) or embedding rows
    aligned with the final hidden states (stock GPT-Neo, which has no output bias)."""
    with torch.no_grad():
        head = model.lm_head
        if getattr(head, "bias", None) is not None:
            head.bias[list(control_ids)] = 1e4
            return
        probe = torch.randint(2, 100, (4, 8))
        h = model(probe, output_hidden_states=True).hidden_states[-1].mean((0, 1))
        for i in control_ids:
            model.get_input_embeddings().weight[i] = 1e3 * h / h.norm()


def test_capability_probes_prompt_behind_the_safe_token(data, monkeypatch):
    from sgtm_engine import evaluate
    from sgtm_engine.config import EvalSpec, MaskingSpec, ModelSpec, Strategy
    from sgtm_engine.model.gpt_neo import GPTNeoLM

    model = GPTNeoLM(ModelSpec(n_layer=1, d_model=32, n_head=4, context=32), MaskingSpec(strategy=Strategy.NONE),
                     vocab_size=data.vocab_size)
    firsts: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: firsts.append(args[0][:, 0].clone()))
    spec = EvalSpec(n_samples=4, sample_tokens=2)
    assert evaluate.language_share(model, data, spec, CPU, "es") is not None
    monkeypatch.setattr(evaluate, "cloze_items", lambda *a: [("La capital de Francia es", "París",
                                                              ["Roma", "Lima", "Quito", "Oslo"])])
    assert evaluate.cloze_accuracy(model, data, Split.FORGET, spec, CPU) is not None
    assert len(firsts) == 1 + 2 and all((f == data.control.safe_id).all() for f in firsts)
