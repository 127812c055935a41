"""Exports any `transformers` user takes as is: stock loading with no unexpected or missing key, the output bias
restored as the model card says, generation past the context, the tokenizer's max length, the card's content, and
the calibrated model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from sgtm_engine.export import export_model
from sgtm_engine.model.hf import OUTPUT_BIAS_NAME, load_hf, restore_output_bias
from sgtm_engine.stage import read_result, run_stage
from tests.engine.tiny import TINY_SGTM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TINY_SGTM
EVALUATE = {"calibrate": {"steps": 3, "batch_size": 2}, "eval": {"max_batches": 1, "capability": False}}


@pytest.fixture(scope="module")
def stages(tmp_path_factory, engine_cache) -> Path:
    root = tmp_path_factory.mktemp("runs")
    run_stage("train", TINY, root / "train", cache_dir=engine_cache)
    run_stage("evaluate", EVALUATE, root / "evaluate", inputs={"model": root / "train"}, cache_dir=engine_cache)
    return root


def _stock_load(path: Path, caplog: pytest.LogCaptureFixture):
    """AutoModelForCausalLM.from_pretrained with transformers' own log captured; returns (model, its log text)."""
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_info()  # the load report is a warning; info shows everything else it says too
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="transformers"):
            model = AutoModelForCausalLM.from_pretrained(path).eval()
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.disable_propagation()
    return model, caplog.text


def test_stock_transformers_loads_an_export_cleanly_and_generates_past_its_context(stages, tmp_path, caplog):
    out = export_model(stages / "train", tmp_path / "export")
    stock, load_log = _stock_load(out, caplog)
    assert "from_pretrained" in load_log or "loading" in load_log.lower()  # the capture saw transformers' log
    for word in ("UNEXPECTED", "MISSING", "unexpected", "missing", "newly initialized", "not used"):
        assert word not in load_log, load_log
    tokenizer = AutoTokenizer.from_pretrained(out)
    context = TINY["model"]["context"]
    assert tokenizer.model_max_length == context
    assert (out / OUTPUT_BIAS_NAME).exists()

    ours = load_hf(read_result(stages / "train")["artifacts"]["model"]).eval()
    restore_output_bias(stock, out)
    ids = torch.randint(0, ours.vocab_size, (2, context))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ours(ids)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(load_hf(out).state_dict()["lm_head.bias"], ours.state_dict()["lm_head.bias"])

    prompt = tokenizer("La historia de", return_tensors="pt")
    generated = stock.generate(**prompt, max_new_tokens=2 * context, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 2 * context > context


def test_model_card_says_method_spec_data_metrics_attribution_and_how_to_restore_the_bias(stages, tmp_path):
    out = export_model(stages / "train", tmp_path / "export")
    card = (out / "README.md").read_text()
    record = read_result(stages / "train")
    assert "sgtm" in card and "trained" in card
    assert record["spec_hash"] in card and "forget_mlp_dim: 32" in card  # the spec, as YAML
    assert "wiki-bilingual" in card and record["manifest_hash"] in card
    some_metric = sorted(record["metrics"])[0]
    assert f"`{some_metric}`" in card
    assert "CC BY-SA 4.0" in card and "Wikipedia contributors" in card
    assert 'load_file("export/output_bias.safetensors")["lm_head.bias"]' in card
    assert "model_max_length" in card and str(4 * TINY["model"]["context"]) in card


def test_dropping_the_output_bias_omits_it(stages, tmp_path, caplog):
    out = export_model(stages / "train", tmp_path / "export", drop_output_bias=True)
    assert not (out / OUTPUT_BIAS_NAME).exists()
    assert "output_bias.safetensors" not in (out / "README.md").read_text()
    stock, load_log = _stock_load(out, caplog)
    assert "UNEXPECTED" not in load_log and "MISSING" not in load_log
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, load_hf(out)(ids)[0], rtol=1e-5, atol=1e-5)


def test_the_calibrated_model_of_an_evaluate_stage_exports(stages, tmp_path):
    record = read_result(stages / "evaluate")
    calibrated = load_hf(record["artifacts"]["calibrated_model"])
    trained = load_hf(record["artifacts"]["model"])
    assert not torch.equal(calibrated.lm_head.bias, trained.lm_head.bias)  # calibration moved the bias
    out = export_model(stages / "evaluate", tmp_path / "calibrated", calibrated=True)
    assert torch.equal(load_hf(out).lm_head.bias, calibrated.lm_head.bias)
    assert "ablated and calibrated" in (out / "README.md").read_text()
    with pytest.raises(Exception, match="calibrated"):
        export_model(stages / "train", tmp_path / "nope", calibrated=True)


def test_an_export_into_a_file_is_refused_naming_out(stages, tmp_path):
    from sgtm_engine.errors import ConfigError

    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match=r"out='.*notes.txt': a file, not a folder"):
        export_model(stages / "train", tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
