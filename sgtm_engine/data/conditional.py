"""Conditional training (Korbak et al. 2023, arXiv 2302.08582): control tokens that say what a document is.

Every training document is prefixed with one control token chosen by its applied label: `<|forget|>` for documents
labelled forget, `<|safe|>` for all others (so the labelling classifier's misses carry the safe token, as a real
classifier's would). Held-out documents are evaluated behind `<|safe|>`, the token a deployment prepends.

Choices made here:
- The two tokens are added to the tokenizer as special tokens (ids `len(base)` and `len(base) + 1`), so
  `decode(..., skip_special_tokens=True)` drops them and document text that spells them is still encoded as plain
  text (the tokenizer encodes with `encode_special_tokens`). Document token ids are unchanged by the addition.
- Control tokens are conditioning only, never targets: a label that is a control token is ignored (the model is
  never trained to emit one), and so is the label right after a control token (the document's first token). The
  second rule makes a prefixed held-out document score exactly the tokens an unprefixed one scores (its first
  token has no context either way), so losses compare across methods.
- Generation never samples a control token unless asked: `suppress_logits` sets their logits to -inf in our
  sampler, and an exported model carries them as `suppress_tokens` in `generation_config.json`, which stock
  `transformers.generate` honours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sgtm_engine.config import MaskMode

FORGET_TOKEN = "<|forget|>"
SAFE_TOKEN = "<|safe|>"
IGNORE = -100


@dataclass(frozen=True)
class ControlTokens:
    forget_id: int
    safe_id: int

    @property
    def ids(self) -> tuple[int, int]:
        return self.forget_id, self.safe_id

    def for_label(self, mode: MaskMode | None) -> int:
        """The prefix of a training document with this applied label."""
        return self.forget_id if mode == MaskMode.FORGET else self.safe_id


def add_control_tokens(tokenizer: PreTrainedTokenizerBase) -> ControlTokens:
    """Add `<|forget|>` and `<|safe|>` as special tokens (in place; idempotent) and return their ids."""
    have = set(tokenizer.get_vocab())
    missing = [t for t in (FORGET_TOKEN, SAFE_TOKEN) if t not in have]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    found = find_control_tokens(tokenizer)
    assert found is not None
    return found


def find_control_tokens(tokenizer: PreTrainedTokenizerBase) -> ControlTokens | None:
    """The control tokens of a (saved) conditional-training tokenizer, or None for an ordinary one."""
    vocab = tokenizer.get_vocab()
    if FORGET_TOKEN not in vocab or SAFE_TOKEN not in vocab:
        return None
    return ControlTokens(vocab[FORGET_TOKEN], vocab[SAFE_TOKEN])


def ignore_control_labels(inputs: torch.Tensor, labels: torch.Tensor, control_ids: Sequence[int]) -> torch.Tensor:
    """`labels` with control-token targets and the targets right after a control token set to -100 (in place)."""
    if not control_ids:
        return labels
    ids = torch.tensor(list(control_ids), device=labels.device)
    labels[torch.isin(labels, ids)] = IGNORE
    labels[torch.isin(inputs, ids)] = IGNORE
    return labels


def suppress_logits(logits: torch.Tensor, banned_ids: Sequence[int]) -> torch.Tensor:
    """Logits with the banned ids at -inf (a copy), so sampling can never pick them."""
    if not banned_ids:
        return logits
    out = logits.clone()
    out[..., list(banned_ids)] = float("-inf")
    return out


def generation_config(control: ControlTokens, eos_token_id: int | None, pad_token_id: int | None) -> dict[str, Any]:
    """A `generation_config.json` for an exported conditional model: control tokens suppressed."""
    cfg: dict[str, Any] = {"suppress_tokens": list(control.ids), "_from_model_config": False}
    if eos_token_id is not None:
        cfg["eos_token_id"] = cfg["bos_token_id"] = eos_token_id
    if pad_token_id is not None:
        cfg["pad_token_id"] = pad_token_id
    return cfg
