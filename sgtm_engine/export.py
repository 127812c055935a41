"""Export a trained (optionally ablated) model as a stock-`transformers` folder with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sgtm_engine.config import AblateSpec, AblationKind
from sgtm_engine.data.conditional import find_control_tokens, generation_config
from sgtm_engine.errors import ConfigError
from sgtm_engine.model.ablation import ablate as ablate_model
from sgtm_engine.model.hf import load_hf, save_hf
from sgtm_engine.stage import read_result


def _resolve(source: Path) -> tuple[Path, Path | None]:
    """(model folder, tokenizer folder or None) from a stage workdir or a checkpoint folder."""
    if (source / "result.json").exists():
        artifacts = read_result(source)["artifacts"]
        tok = artifacts.get("tokenizer")
        return Path(artifacts["model"]), Path(tok) if tok else None
    if (source / "config.json").exists():
        for candidate in (source.parent.parent / "tokenizer", source.parent / "tokenizer"):
            if candidate.exists():
                return source, candidate
        return source, None
    raise ConfigError(f"checkpoint={source}: neither a stage workdir (result.json) nor a model folder (config.json)")


def export_model(source: Path, out: Path, ablate: str | None = None, seed: int = 0,
                 drop_output_bias: bool = False) -> Path:
    model_dir, tok_dir = _resolve(Path(source))
    model = load_hf(model_dir)
    if ablate is not None:
        try:
            kind = AblationKind(ablate)
        except ValueError:
            raise ConfigError(f"ablate={ablate!r}: use 'zero' or 'reinit'") from None
        ablate_model(model, AblateSpec(kind=kind, seed=seed))
    if drop_output_bias and model.lm_head.bias is not None:
        with torch.no_grad():
            model.lm_head.bias.zero_()
    eos = pad = control = None
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        tokenizer.save_pretrained(out)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        control = find_control_tokens(tokenizer)
    path = save_hf(model, out, eos_token_id=eos, pad_token_id=pad)
    if control is not None:  # conditional training: `generate` must never sample a control token
        (path / "generation_config.json").write_text(json.dumps(generation_config(control, eos, pad), indent=2))
    return path
