"""Moving models between our GPTNeoLM and Hugging Face `transformers` (GPTNeoForCausalLM), both ways.

Checkpoints are written in the Hugging Face layout (`config.json` + `model.safetensors`, same tensor names), so
`AutoModelForCausalLM.from_pretrained(dir)` loads them with stock `transformers`, and stock GPT-Neo checkpoints load
here. Our extras ride along as extra config attributes (`sgtm_masking`, `sgtm_output_bias`, `sgtm_context`), which
stock `transformers` keeps but ignores.

The one thing stock GPT-Neo cannot represent is the paper's output bias (`lm_head.bias`). It lives in its own file,
`output_bias.safetensors`, so `model.safetensors` holds exactly the tensors of a stock GPTNeoForCausalLM: stock
loading reports no unexpected or missing key. `load_hf` restores the bias; a stock user restores it with
`restore_output_bias`'s three lines (the export's model card prints them). Without it, stock logits differ from ours
by exactly that per-vocabulary constant.

A position table may hold more rows than the context (`sgtm_context`; exports do this so that stock `generate`
continues past the context instead of failing, export.py); `load_hf` keeps the first `context` rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sgtm_engine.config import MaskingSpec, ModelSpec, Strategy, from_dict, to_dict
from sgtm_engine.model.gpt_neo import GPTNeoLM

WEIGHTS_NAME = "model.safetensors"
OUTPUT_BIAS_NAME = "output_bias.safetensors"
OUTPUT_BIAS_KEY = "lm_head.bias"


def hf_config_dict(spec: ModelSpec, vocab_size: int, masking: MaskingSpec | None = None,
                   eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """The `config.json` of a GPTNeoForCausalLM with our shape (plus our extras under `sgtm_*`)."""
    types = list(spec.layer_types)
    cfg: dict[str, Any] = {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.context,
        "hidden_size": spec.d_model,
        "num_layers": spec.n_layer,
        "num_heads": spec.n_head,
        "intermediate_size": spec.mlp_dim,
        "window_size": spec.window_size,
        "attention_types": [[[t], 1] for t in types],
        "activation_function": "gelu_new",
        "resid_dropout": 0.0,
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "classifier_dropout": 0.0,
        "layer_norm_epsilon": spec.layer_norm_eps,
        "initializer_range": spec.init_std,
        "use_cache": True,
        "tie_word_embeddings": True,
        "sgtm_output_bias": spec.output_bias,
        "sgtm_context": spec.context,
        "sgtm_masking": to_dict(masking) if masking is not None else None,
    }
    # always written: GPT-Neo's defaults (GPT-2's 50256) lie outside most of our vocabularies
    cfg["eos_token_id"] = cfg["bos_token_id"] = eos_token_id
    if pad_token_id is not None:
        cfg["pad_token_id"] = pad_token_id
    return cfg


def spec_from_hf_config(cfg: dict[str, Any]) -> tuple[ModelSpec, MaskingSpec | None, int]:
    """(ModelSpec, MaskingSpec or None, vocab size) from a GPT-Neo `config.json` (ours or stock)."""
    layers: list[str] = []
    for pattern, repeat in cfg.get("attention_types", [[["global", "local"], cfg["num_layers"] // 2]]):
        layers += list(pattern) * repeat
    spec = ModelSpec(
        n_layer=cfg["num_layers"], d_model=cfg["hidden_size"], n_head=cfg["num_heads"],
        context=cfg.get("sgtm_context") or cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
        d_mlp=cfg.get("intermediate_size") or None, window_size=cfg.get("window_size", 256),
        attention_layers=tuple(layers), output_bias=bool(cfg.get("sgtm_output_bias", False)),
        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), init_std=cfg.get("initializer_range", 0.02),
    )
    masking = from_dict(MaskingSpec, cfg["sgtm_masking"]) if cfg.get("sgtm_masking") else None
    return spec, masking, cfg["vocab_size"]


def save_hf(model: GPTNeoLM, out_dir: str | Path, eos_token_id: int | None = None,
            pad_token_id: int | None = None, with_masking: bool = True, with_output_bias: bool = True) -> Path:
    """Write `config.json` + `model.safetensors` loadable by stock `AutoModelForCausalLM.from_pretrained`, and the
    output bias (if the model has one and `with_output_bias`) in `output_bias.safetensors`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bias = model.lm_head.bias if with_output_bias else None
    spec = model.spec if bias is not None else dataclasses.replace(model.spec, output_bias=False)
    cfg = hf_config_dict(spec, model.vocab_size, model.masking if with_masking else None, eos_token_id, pad_token_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k not in ("lm_head.weight", OUTPUT_BIAS_KEY)}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if bias is not None:
        save_file({OUTPUT_BIAS_KEY: bias.detach().cpu().contiguous()}, str(out / OUTPUT_BIAS_NAME),
                  metadata={"format": "pt"})
    return out


def restore_output_bias(hf_model, path: str | Path) -> None:
    """Give a stock GPTNeoForCausalLM loaded from `path` the output bias saved beside it (if there is one)."""
    bias_file = Path(path) / OUTPUT_BIAS_NAME
    if bias_file.exists():
        bias = load_file(str(bias_file))[OUTPUT_BIAS_KEY]
        hf_model.lm_head.bias = torch.nn.Parameter(bias.to(hf_model.lm_head.weight))


def load_hf(path: str | Path, masking: MaskingSpec | None = None, device: str | torch.device = "cpu") -> GPTNeoLM:
    """Load a GPT-Neo checkpoint directory (ours or a stock `save_pretrained`) into GPTNeoLM."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    spec, saved_masking, vocab = spec_from_hf_config(cfg)
    state = read_state(path)
    if "lm_head.bias" in state and not spec.output_bias:
        spec = dataclasses.replace(spec, output_bias=True)
    model = GPTNeoLM(spec, masking or saved_masking or MaskingSpec(strategy=Strategy.NONE), vocab_size=vocab)
    load_state(model, state)
    return model.to(device)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: the stock weights and, beside them, our output bias if it was kept."""
    path = Path(path)
    if (path / WEIGHTS_NAME).exists():
        state = load_file(str(path / WEIGHTS_NAME))
    else:
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if (path / OUTPUT_BIAS_NAME).exists():
        state.update(load_file(str(path / OUTPUT_BIAS_NAME)))
    return state


def load_state(model: GPTNeoLM, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict with HF names; the tied lm_head.weight and HF's attention-mask buffers are optional."""
    state = {k: v for k, v in state.items() if not k.endswith((".attn.attention.bias", ".attn.attention.masked_bias"))}
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: model.spec.context]  # see the docstring
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


def to_hf_model(model: GPTNeoLM):  # -> transformers.GPTNeoForCausalLM
    """An in-memory stock GPTNeoForCausalLM with our weights (without the output bias, which it cannot hold)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = hf_config_dict(model.spec, model.vocab_size)
    cfg.pop("architectures"), cfg.pop("model_type")
    hf = GPTNeoForCausalLM(GPTNeoConfig(**cfg))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.bias"}
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf


def from_hf_model(hf_model, masking: MaskingSpec | None = None) -> GPTNeoLM:
    """Our GPTNeoLM holding a stock GPTNeoForCausalLM's weights (output bias off, as stock has none)."""
    spec, _, vocab = spec_from_hf_config(hf_model.config.to_dict())
    model = GPTNeoLM(spec, masking, vocab_size=vocab)
    load_state(model, dict(hf_model.state_dict()))
    return model
