"""Export a trained, ablated or calibrated model as a folder any `transformers` user loads as is.

What an export holds, and why:
- `config.json` + `model.safetensors`: exactly a stock GPTNeoForCausalLM's tensors, so `from_pretrained` reports no
  unexpected or missing key; `output_bias.safetensors` beside them when the model has an output bias (model/hf.py;
  `drop_output_bias` omits it).
- The tokenizer, its `model_max_length` the model's context.
- A position table longer than the context (`positions`, default 4 x context): the rows past the context repeat the
  last trained position. Stock `generate` with `max_new_tokens` does not stop at `max_position_embeddings` (it only
  warns), and a GPT-Neo position lookup past the table fails with an IndexError; a longer table with a defined
  meaning lets generation run on, while logits within the context stay exactly the trained model's.
- `README.md`, the model card (model_card.py): method, spec, data, metrics, attribution, how to load.
- The calibrated model comes from an evaluate stage that calibrated (it saves `artifacts.calibrated_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sgtm_engine.config import AblateSpec, AblationKind
from sgtm_engine.data.conditional import find_control_tokens, generation_config
from sgtm_engine.errors import ConfigError
from sgtm_engine.folders import RESULT, make_folder
from sgtm_engine.model.ablation import ablate as ablate_model
from sgtm_engine.model.hf import OUTPUT_BIAS_NAME, WEIGHTS_NAME, load_hf, save_hf
from sgtm_engine.model_card import model_card
from sgtm_engine.stage import read_result

POSITIONS_PER_CONTEXT = 4
"""Default position table of an export, in contexts."""
_VARIANTS = {"train": "trained", "ablate": "ablated", "attack": "fine-tuned by the attack",
             "rmu": "unlearned with RMU"}


def _resolve(source: Path, calibrated: bool) -> tuple[Path, Path | None, dict[str, Any] | None]:
    """(model folder, tokenizer folder or None, the stage's result record or None) of a stage workdir or a
    checkpoint folder."""
    if (source / RESULT).exists():
        record = read_result(source)
        artifacts = record["artifacts"]
        tok = artifacts.get("tokenizer")
        model = artifacts.get("calibrated_model") if calibrated else artifacts.get("model")
        if model is None:
            raise ConfigError(f"checkpoint={source}: no calibrated model here; export an evaluate stage that "
                              "calibrated (calibrate.steps > 0 and ablate set), or drop --calibrated"
                              if calibrated else f"checkpoint={source}: this stage produced no model")
        return Path(model), Path(tok) if tok else None, record
    if calibrated:
        raise ConfigError(f"checkpoint={source}: --calibrated needs an evaluate stage's workdir (with {RESULT})")
    if (source / "config.json").exists():
        for candidate in (source.parent.parent / "tokenizer", source.parent / "tokenizer"):
            if candidate.exists():
                return source, candidate, None
        return source, None, None
    raise ConfigError(f"checkpoint={source}: neither a stage workdir ({RESULT}) nor a model folder (config.json)")


def export_model(source: Path, out: Path, ablate: str | None = None, seed: int = 0, drop_output_bias: bool = False,
                 calibrated: bool = False, positions: int | None = None) -> Path:
    """Write the model of `source` (a stage workdir or a checkpoint folder) to `out`; returns `out`.

    Args:
        ablate: 'zero' or 'reinit': ablate the forget slice first.
        seed: the re-init ablation's seed.
        drop_output_bias: omit the output bias (stock logits then equal the exported model's without any extra step).
        calibrated: export an evaluate stage's calibrated model.
        positions: rows of the exported position table (default 4 x context; at least the context).
    """
    model_dir, tok_dir, record = _resolve(Path(source), calibrated)
    make_folder(Path(out), "out")
    model = load_hf(model_dir)
    variant = "ablated and calibrated" if calibrated else _VARIANTS.get((record or {}).get("kind"), "trained")
    if ablate is not None:
        try:
            kind = AblationKind(ablate)
        except ValueError:
            raise ConfigError(f"ablate={ablate!r}: use 'zero' or 'reinit'") from None
        ablate_model(model, AblateSpec(kind=kind, seed=seed))
        variant = f"ablated ({kind.value})"
    context = model.spec.context
    positions = POSITIONS_PER_CONTEXT * context if positions is None else positions
    if positions < context:
        raise ConfigError(f"positions={positions}: must be at least the context ({context})")
    eos = pad = control = None
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        tokenizer.model_max_length = context
        tokenizer.save_pretrained(out)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        control = find_control_tokens(tokenizer)
    path = save_hf(model, out, eos_token_id=eos, pad_token_id=pad, with_output_bias=not drop_output_bias)
    config = _extend_positions(path, positions)
    if control is not None:  # conditional training: `generate` must never sample a control token
        (path / "generation_config.json").write_text(json.dumps(generation_config(control, eos, pad), indent=2))
    has_bias = (path / OUTPUT_BIAS_NAME).exists()
    (path / "README.md").write_text(model_card(record=record, config=config, has_output_bias=has_bias,
                                               variant=variant, path_hint=path.name))
    return path


def _extend_positions(path: Path, rows: int) -> dict[str, Any]:
    """Grow the saved position table to `rows`, repeating its last row; returns the updated config."""
    config = json.loads((path / "config.json").read_text())
    state = load_file(str(path / WEIGHTS_NAME))
    table = state["transformer.wpe.weight"]
    extra = table[-1:].expand(rows - table.shape[0], -1)
    state["transformer.wpe.weight"] = torch.cat([table, extra]).contiguous()
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    config["max_position_embeddings"] = rows
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return config
