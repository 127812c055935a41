"""The model's shape (`ModelSpec`, the paper's presets) and which slice of it is forget (`MaskingSpec`).

Choices made here:
- Forget sizes are per masked block: `forget_mlp_dim` MLP units + `forget_attn_heads` heads, or `forget_param_perc`
  (a percentage of units and heads per block, not of parameters; integer arithmetic, forget side gets the ceiling).
- Checks that need both specs (the forget slice must leave some retain units) live in `MaskingSpec.problems_with`,
  called by the stage spec that holds both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sgtm_engine.config.checks import FORBID_EXTRA, Checks
from sgtm_engine.config.vocabulary import OptimizerKind, Strategy
from sgtm_engine.errors import ConfigError, Problem

# ---------------------------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-Neo-shaped decoder. Parameter names and shapes match `transformers.GPTNeoForCausalLM`."""

    __pydantic_config__ = FORBID_EXTRA

    n_layer: int = 4
    """Transformer blocks."""
    d_model: int = 128
    """Hidden size."""
    n_head: int = 32
    """Attention heads; the paper always uses 32 (head_dim = d_model / 32)."""
    context: int = 256
    """Maximum sequence length (size of the learned position table)."""
    vocab_size: int | None = None
    """Vocabulary size; None takes it from the data's tokenizer when the stage runs."""
    d_mlp: int | None = None
    """MLP hidden units; None means 4 * d_model."""
    window_size: int = 256
    """Sliding window of the local-attention layers."""
    attention_layers: tuple[str, ...] | None = None
    """'global' or 'local' per layer; None alternates global, local, ... as GPT-Neo does."""
    output_bias: bool = True
    """The paper's extra lm_head bias (zero-initialized); the only parameter logit calibration touches."""
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    """N(0, init_std) for every weight of every variant (the reference's split layers escaped this; we do not)."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.bound("n_layer", "d_model", "n_head", "window_size", ge=1)
        c.bound("context", ge=2)
        c.bound("vocab_size", ge=2, nullable=True)
        c.bound("d_mlp", ge=1, nullable=True, fix=" (null: 4*d_model)")
        c.bound("layer_norm_eps", "init_std", gt=0)
        if self.n_head >= 1 and self.d_model >= 1:
            c.require(self.d_model % self.n_head == 0, "d_model", f"must be divisible by n_head={self.n_head}; "
                      f"pick a multiple of {self.n_head}", reads=("n_head",))
        if self.attention_layers is not None:
            c.require(len(self.attention_layers) == self.n_layer, "attention_layers",
                      f"has {len(self.attention_layers)} entries: need one per layer (n_layer={self.n_layer})",
                      reads=("n_layer",), show_value=False)
            bad = sorted({a for a in self.attention_layers if a not in ("global", "local")})
            c.require(not bad, "attention_layers", "each entry must be 'global' or 'local'", value=bad)
        c.done()

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def layer_types(self) -> tuple[str, ...]:
        if self.attention_layers is not None:
            return self.attention_layers
        return tuple("global" if i % 2 == 0 else "local" for i in range(self.n_layer))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelSpec:
        """A named shape from the paper (`ts-8m` … `wiki-254m`) or a CPU size, with field overrides."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"model preset {name!r} is unknown: choose one of {sorted(MODEL_PRESETS)}")
        return dataclasses.replace(MODEL_PRESETS[name], **overrides)

    def n_params(self, vocab_size: int | None = None) -> int:
        """Parameter count with tied embeddings (output bias included), for FLOPs accounting."""
        v = vocab_size or self.vocab_size or 50257
        d, m = self.d_model, self.mlp_dim
        block = 2 * 2 * d + 3 * d * d + d * d + d + d * m + m + m * d + d
        return v * d + self.context * d + self.n_layer * block + 2 * d + (v if self.output_bias else 0)


#: The paper's 8 shapes (TinyStories 8M-64M, Wikipedia 34M-254M; vocab = GPT-2's 50,257) plus CPU-sized shapes
#: for the embedded data.
MODEL_PRESETS: dict[str, ModelSpec] = {
    "ts-8m": ModelSpec(n_layer=6, d_model=128, context=512, vocab_size=50257),
    "ts-18m": ModelSpec(n_layer=6, d_model=256, context=512, vocab_size=50257),
    "ts-34m": ModelSpec(n_layer=8, d_model=384, context=512, vocab_size=50257),
    "ts-64m": ModelSpec(n_layer=12, d_model=512, context=512, vocab_size=50257),
    "wiki-34m": ModelSpec(n_layer=8, d_model=384, context=1024, vocab_size=50257),
    "wiki-64m": ModelSpec(n_layer=12, d_model=512, context=1024, vocab_size=50257),
    "wiki-125m": ModelSpec(n_layer=12, d_model=768, context=1024, vocab_size=50257),
    "wiki-254m": ModelSpec(n_layer=16, d_model=1024, context=1024, vocab_size=50257),
    "cpu-demo": ModelSpec(n_layer=4, d_model=128, context=256),
    "cpu-tiny": ModelSpec(n_layer=2, d_model=64, context=128),
}


# ---------------------------------------------------------------------------------------------------------------------
# Masking


@dataclass(frozen=True)
class MaskingSpec:
    """Which slice of every block is forget, how forget/retain steps treat it, and how the optimizer honours it."""

    __pydantic_config__ = FORBID_EXTRA

    strategy: Strategy = Strategy.SGTM
    forget_mlp_dim: int | None = None
    """Forget MLP units per masked block (the tail of the hidden dim). With forget_attn_heads; default 64."""
    forget_attn_heads: int | None = None
    """Forget heads per masked block (the last heads). With forget_mlp_dim; default 1."""
    forget_param_perc: float | None = None
    """Alternative to the two counts: percent of MLP units and of heads per block (forget side gets the ceiling)."""
    masked_layers: tuple[int, ...] | None = None
    """Block indices that carry a forget slice; None = all. Other blocks are stock."""
    mask_embeddings: bool = False
    """Forget steps also zero the gradients of wte and wpe (tied: the unembedding too). Paper: Wikipedia on."""
    mask_layernorms: bool | None = None
    """Forget steps also zero ln_1/ln_2 gradients of masked blocks. None = the paper's rule: with mask_embeddings,
    for strategy 'sgtm' only."""
    optimizer: OptimizerKind = OptimizerKind.MASK_AWARE

    def __post_init__(self) -> None:
        c = Checks(self)
        counts_given = self.forget_mlp_dim is not None or self.forget_attn_heads is not None
        c.require(not (counts_given and self.forget_param_perc is not None), "forget_param_perc",
                  "give either forget_param_perc or forget_mlp_dim/forget_attn_heads, not both",
                  reads=("forget_mlp_dim", "forget_attn_heads"), show_value=False)
        c.bound("forget_mlp_dim", "forget_attn_heads", ge=0, nullable=True)
        c.bound("forget_param_perc", ge=0, le=100, nullable=True, kind="a percentage")
        if self.masked_layers is not None:
            layers = list(self.masked_layers)
            c.require(len(set(layers)) == len(layers), "masked_layers", "indices must be unique", value=layers)
            c.require(all(i >= 0 for i in layers), "masked_layers", "indices must be >= 0", value=layers)
        c.done()

    def forget_sizes(self, model: ModelSpec) -> tuple[int, int]:
        """(forget MLP units, forget heads) per masked block, with exact integer rounding."""
        if self.forget_param_perc is not None:
            keep = 1 - Fraction(str(self.forget_param_perc)) / 100  # str(): 1.1 stays 11/10, not its binary neighbour
            return model.mlp_dim - math.floor(model.mlp_dim * keep), model.n_head - math.floor(model.n_head * keep)
        mlp = 64 if self.forget_mlp_dim is None else self.forget_mlp_dim
        heads = 1 if self.forget_attn_heads is None else self.forget_attn_heads
        return mlp, heads

    def layers(self, model: ModelSpec) -> tuple[int, ...]:
        if self.strategy == Strategy.NONE:
            return ()
        return tuple(range(model.n_layer)) if self.masked_layers is None else tuple(sorted(self.masked_layers))

    def masks_layernorms(self) -> bool:
        if self.mask_layernorms is not None:
            return self.mask_layernorms
        return self.mask_embeddings and self.strategy == Strategy.SGTM

    def problems_with(self, model: ModelSpec) -> list[Problem]:
        """Checks that need the model's shape (located under `masking`)."""
        if self.strategy == Strategy.NONE:
            return []
        c = Checks(self)
        mlp, heads = self.forget_sizes(model)
        c.require(0 <= mlp < model.mlp_dim, "forget_mlp_dim",
                  f"must be below the MLP width {model.mlp_dim} (some units must stay retain)", value=mlp)
        c.require(0 <= heads < model.n_head, "forget_attn_heads",
                  f"must be below n_head={model.n_head} (some heads must stay retain)", value=heads)
        if mlp + heads <= 0:
            c.problems.append(Problem.at((), "the forget slice is empty; set forget_mlp_dim or forget_attn_heads > 0"))
        bad = [i for i in self.masked_layers or () if i >= model.n_layer]
        c.require(not bad, "masked_layers", f"out of range for n_layer={model.n_layer}", value=bad)
        return [p.nested(("masking",)) for p in c.problems]
