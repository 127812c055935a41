"""One config schema for the CLI, YAML recipes and the REST body: frozen stdlib dataclasses, no torch.

Choices made here:
- Every spec validates itself in `__post_init__` and reports every problem at once, each naming the field, the value
  and the fix (`ConfigError.problems`). `from_dict` builds nested specs from plain dicts (YAML/JSON), rejects unknown
  keys, and prefixes problems with their dotted field path (`train.masking.forget_mlp_dim`).
- `__pydantic_config__` forbids unknown keys when the API validates these dataclasses with pydantic's `TypeAdapter`;
  it is a plain dict, so the engine stays free of pydantic.
- Forget sizes are per masked block: `forget_mlp_dim` MLP units + `forget_attn_heads` heads, or `forget_param_perc`
  (a percentage of units and heads per block, not of parameters; integer arithmetic, forget side gets the ceiling).
- Mode names: `MaskMode` is the applied label of one optimizer step (default / retain / forget); `Split` names data.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar

from sgtm_engine.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary


class Split(enum.StrEnum):
    """What a document is (its true label)."""

    RETAIN = "retain"
    FORGET = "forget"
    ADJACENT = "adjacent"


class MaskMode(enum.StrEnum):
    """The label applied to one optimizer step, which decides how masking treats it."""

    DEFAULT = "default"  # unlabelled: ordinary training, every parameter learns
    RETAIN = "retain"  # forward with the forget slice zeroed: the forget slice gets no gradient
    FORGET = "forget"  # strategy-specific: only the forget slice learns (SGTM), or retain paths are cut (GR, AM)


class Strategy(enum.StrEnum):
    """How forget data is localized. method-reference.md §3."""

    NONE = "none"  # a clean model: stock forward, no gradient surgery
    SGTM = "sgtm"  # parameter-gradient masking, down-projections and their biases included
    GRADIENT_ROUTING = "gradient_routing"  # retain activations detached on forget steps
    ACTIVATION_MASKING = "activation_masking"  # retain activations zeroed on forget steps
    SGTM_JOINT_PROJECTION = "sgtm_joint_projection"  # c_proj and out_proj are joint (paper App. A)
    SGTM_JOINT_MLP_PROJECTION = "sgtm_joint_mlp_projection"  # only c_proj is joint
    SGTM_JOINT_ATTN_PROJECTION = "sgtm_joint_attn_projection"  # only out_proj is joint
    SGTM_JOINT_ATTENTION = "sgtm_joint_attention"  # stock attention; MLP masked on c_fc only (Memorization Sinks-like)


class OptimizerKind(enum.StrEnum):
    MASK_AWARE = "mask_aware"  # masked coordinates keep weight, both moments and step count bit-identical
    LEGACY = "legacy"  # one AdamW over everything: the paper's runs (zeroed grads still move weights)


class AblationKind(enum.StrEnum):
    ZERO = "zero"  # the paper: the forget slice set to 0 (a stationary point for fine-tuning)
    REINIT = "reinit"  # re-drawn from N(0, std of the matching retain slice): a stronger attacker's start


class AttackData(enum.StrEnum):
    """What the fine-tuning attacker trains on (method-reference.md §9.1)."""

    MIXTURE = "mixture"  # every train split, forget upsampled, one split per step (the paper)
    FORGET_ONLY = "forget_only"  # forget train documents only


class NoiseModel(enum.StrEnum):
    PRECISION_RECALL = "precision_recall"
    TPR_FPR = "tpr_fpr"


class NoiseGranularity(enum.StrEnum):
    DOCUMENT = "document"  # one fixed label per document for the whole run (a deterministic classifier)
    BATCH = "batch"  # re-drawn per logical batch every epoch (paper parity)


class FalsePositiveSource(enum.StrEnum):
    """Which non-forget data the labelling classifier flags as forget by mistake."""

    RETAIN_AND_ADJACENT = "retain_and_adjacent"  # uniformly over all negatives (a rate-like classifier)
    ADJACENT_FIRST = "adjacent_first"  # adjacent data first, retain only once adjacent is used up
    ADJACENT_ONLY = "adjacent_only"  # the reference: adjacent data only; the count saturates there


class FilterKind(enum.StrEnum):
    NONE = "none"  # train on everything
    WEAK = "weak"  # drop documents labelled forget
    STRICT = "strict"  # drop documents labelled forget and every adjacent document


class FilterMatching(enum.StrEnum):
    COMPUTE = "compute"  # same optimizer-step count: dropped data is replaced by more of the rest (Wikipedia)
    EPOCH = "epoch"  # dropped steps are skipped; the LR schedule still spans them (TinyStories)


class Device(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(enum.StrEnum):
    AUTO = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"


class StageKind(enum.StrEnum):
    TRAIN = "train"
    ABLATE = "ablate"
    EVALUATE = "evaluate"
    ATTACK = "attack"
    RMU = "rmu"


_FORBID_EXTRA = {"extra": "forbid"}


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-Neo-shaped decoder. Parameter names and shapes match `transformers.GPTNeoForCausalLM`."""

    __pydantic_config__ = _FORBID_EXTRA

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
        p: list[str] = []
        _check(p, self.n_layer >= 1, f"n_layer={self.n_layer}: must be >= 1")
        _check(p, self.d_model >= 1, f"d_model={self.d_model}: must be >= 1")
        _check(p, self.n_head >= 1, f"n_head={self.n_head}: must be >= 1")
        if self.n_head >= 1 and self.d_model >= 1:
            _check(p, self.d_model % self.n_head == 0,
                   f"d_model={self.d_model}: must be divisible by n_head={self.n_head}; "
                   f"pick a multiple of {self.n_head}")
        _check(p, self.context >= 2, f"context={self.context}: must be >= 2")
        _check(p, self.vocab_size is None or self.vocab_size >= 2,
               f"vocab_size={self.vocab_size}: must be >= 2 or null")
        _check(p, self.d_mlp is None or self.d_mlp >= 1, f"d_mlp={self.d_mlp}: must be >= 1 or null (4*d_model)")
        _check(p, self.window_size >= 1, f"window_size={self.window_size}: must be >= 1")
        if self.attention_layers is not None:
            _check(p, len(self.attention_layers) == self.n_layer,
                   f"attention_layers has {len(self.attention_layers)} entries: "
                   f"need one per layer (n_layer={self.n_layer})")
            bad = sorted({a for a in self.attention_layers if a not in ("global", "local")})
            _check(p, not bad, f"attention_layers={bad}: each entry must be 'global' or 'local'")
        _check(p, self.layer_norm_eps > 0, f"layer_norm_eps={self.layer_norm_eps}: must be > 0")
        _check(p, self.init_std > 0, f"init_std={self.init_std}: must be > 0")
        _raise_if(p)

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


#: The paper's 8 shapes (method-reference.md §10; vocab = GPT-2's 50,257) plus CPU-sized shapes for the embedded data.
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

    __pydantic_config__ = _FORBID_EXTRA

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
        p: list[str] = []
        counts_given = self.forget_mlp_dim is not None or self.forget_attn_heads is not None
        if counts_given and self.forget_param_perc is not None:
            p.append("forget_param_perc: give either forget_param_perc or forget_mlp_dim/forget_attn_heads, not both")
        if self.forget_mlp_dim is not None:
            _check(p, self.forget_mlp_dim >= 0, f"forget_mlp_dim={self.forget_mlp_dim}: must be >= 0")
        if self.forget_attn_heads is not None:
            _check(p, self.forget_attn_heads >= 0, f"forget_attn_heads={self.forget_attn_heads}: must be >= 0")
        if self.forget_param_perc is not None:
            _check(p, 0 <= self.forget_param_perc <= 100 and math.isfinite(self.forget_param_perc),
                   f"forget_param_perc={self.forget_param_perc}: must be a percentage in [0, 100]")
        if self.masked_layers is not None:
            _check(p, len(set(self.masked_layers)) == len(self.masked_layers),
                   f"masked_layers={list(self.masked_layers)}: indices must be unique")
            _check(p, all(i >= 0 for i in self.masked_layers),
                   f"masked_layers={list(self.masked_layers)}: indices must be >= 0")
        _raise_if(p)

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

    def problems_with(self, model: ModelSpec) -> list[str]:
        """Checks that need the model's shape."""
        if self.strategy == Strategy.NONE:
            return []
        p: list[str] = []
        mlp, heads = self.forget_sizes(model)
        _check(p, 0 <= mlp < model.mlp_dim,
               f"masking.forget_mlp_dim={mlp}: must be below the MLP width {model.mlp_dim} "
               "(some units must stay retain)")
        _check(p, 0 <= heads < model.n_head,
               f"masking.forget_attn_heads={heads}: must be below n_head={model.n_head} (some heads must stay retain)")
        _check(p, mlp + heads > 0, "masking: the forget slice is empty; set forget_mlp_dim or forget_attn_heads > 0")
        bad = [i for i in self.masked_layers or () if i >= model.n_layer]
        _check(p, not bad, f"masking.masked_layers={bad}: out of range for n_layer={model.n_layer}")
        return p


# ---------------------------------------------------------------------------------------------------------------------
# Data, label noise, filters


#: Registered tokenizers (name -> Hugging Face hub id). The API takes these names, never a path or URL.
TOKENIZERS: dict[str, str] = {"gpt2": "openai-community/gpt2"}


@dataclass(frozen=True)
class DataSpec:
    """Which corpus, how it is tokenized, split and held out."""

    __pydantic_config__ = _FORBID_EXTRA

    corpus: str = "wiki-bilingual"
    """A registry name: wiki-bilingual, wiki-bio, tinystories-bilingual, wikipedia-ores, or an operator-registered
    one."""
    vocab_size: int = 8192
    """Size of the byte-level BPE trained on the corpus (embedded corpora); hub corpora use GPT-2's tokenizer."""
    test_docs_per_category: int = 50
    """Held-out documents per (split, category), drawn with `seed`."""
    max_docs_per_split: int | None = None
    """Cap on training documents per split (for quick runs); None = all."""
    tokenizer: str | None = None
    """A registered tokenizer name instead of a BPE trained on the corpus: 'gpt2' (the paper's GPT-2 BPE, fetched
    from the Hugging Face hub on first use, so it needs the internet once). None trains a byte-level BPE."""
    learn_eot: bool = True
    """Train on end-of-text (a separate pad id). False = the reference's pad == EOT, every EOT label ignored."""
    upsample_retain: float = 1.0
    upsample_forget: float = 1.0
    upsample_adjacent: float = 1.0
    seed: int = 0
    conditional: bool = False
    """Conditional training (Korbak et al. 2023): every training document is prefixed with a control token,
    `<|forget|>` when labelled forget, else `<|safe|>`; held-out documents are evaluated behind `<|safe|>`. Needs
    document-granular labels (data/conditional.py)."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, bool(self.corpus), "corpus='': name a registered corpus, e.g. 'wiki-bilingual'")
        _check(p, 256 < self.vocab_size <= 1 << 20, f"vocab_size={self.vocab_size}: must be in (256, 1048576]")
        _check(p, self.tokenizer in (None, *TOKENIZERS),
               f"tokenizer={self.tokenizer!r}: use null (train a BPE) or one of {sorted(TOKENIZERS)}")
        _check(p, self.test_docs_per_category >= 1,
               f"test_docs_per_category={self.test_docs_per_category}: must be >= 1")
        _check(p, self.max_docs_per_split is None or self.max_docs_per_split >= 1,
               f"max_docs_per_split={self.max_docs_per_split}: must be >= 1 or null")
        for name in ("upsample_retain", "upsample_forget", "upsample_adjacent"):
            v = getattr(self, name)
            _check(p, v >= 0 and math.isfinite(v), f"{name}={v}: must be >= 0 (0 removes the split)")
        _raise_if(p)


@dataclass(frozen=True)
class NoiseSpec:
    """The labelling classifier: which true-forget documents are caught, which others are flagged by mistake."""

    __pydantic_config__ = _FORBID_EXTRA

    model: NoiseModel = NoiseModel.PRECISION_RECALL
    precision: float = 1.0
    recall: float = 1.0
    """1 - recall is the paper's 'undiscovered forget' rate."""
    tpr: float = 1.0
    fpr: float = 0.0
    """Corrected definition: false positives = fpr * negatives, drawn from retain and adjacent data."""
    granularity: NoiseGranularity = NoiseGranularity.DOCUMENT
    fp_source: FalsePositiveSource = FalsePositiveSource.RETAIN_AND_ADJACENT
    """Where false positives come from (both noise models): 'retain_and_adjacent', 'adjacent_first' or
    'adjacent_only' (the reference's precision/recall mode)."""
    forget_retain_frac: float = 0.0
    """Share of caught forget steps applied as retain mode (paper's forget_retain_perc / 100)."""
    adjacent_retain_frac: float = 0.0
    retain_retain_frac: float = 0.0
    """Share of retain steps in retain mode (paper: 0.25 TinyStories, 0.10 Wikipedia); the main lever on ablation
    damage."""
    seed: int = 0

    def __post_init__(self) -> None:
        p: list[str] = []
        for name in ("precision", "recall", "tpr", "fpr", "forget_retain_frac", "adjacent_retain_frac",
                     "retain_retain_frac"):
            v = getattr(self, name)
            _check(p, 0.0 <= v <= 1.0, f"{name}={v}: must be a probability in [0, 1]")
        if self.model == NoiseModel.PRECISION_RECALL:
            _check(p, self.precision > 0, f"precision={self.precision}: must be > 0 (false positives = TP*(1/P - 1))")
        _raise_if(p)

    @property
    def true_positive_rate(self) -> float:
        return self.recall if self.model == NoiseModel.PRECISION_RECALL else self.tpr


@dataclass(frozen=True)
class FilterSpec:
    """Data filtering baselines. The labels come from the noise model, so recall < 1 gives a 'recall r' filter."""

    __pydantic_config__ = _FORBID_EXTRA

    kind: FilterKind = FilterKind.NONE
    matching: FilterMatching = FilterMatching.COMPUTE


# ---------------------------------------------------------------------------------------------------------------------
# Optimization, ablation, calibration, evaluation


@dataclass(frozen=True)
class OptimSpec:
    """AdamW and its schedule: linear warmup from warmup_start * lr, then cosine to min_lr_ratio * lr."""

    __pydantic_config__ = _FORBID_EXTRA

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to every parameter (the paper has no no-decay groups)."""
    warmup_steps: int = 50
    warmup_start: float = 0.1
    min_lr_ratio: float = 0.0
    schedule: str = "cosine"
    """'cosine' or 'constant' (after warmup)."""
    grad_clip: float | None = None
    """Max global grad norm; None = no clipping (the paper)."""
    fused: bool = True
    """torch's fused AdamW kernel (same math, ~10x less time on large tensors); false = single-tensor reference."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr}: must be > 0")
        _check(p, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"betas={list(self.betas)}: need two values in [0, 1)")
        _check(p, self.eps > 0, f"eps={self.eps}: must be > 0")
        _check(p, self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0")
        _check(p, self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0")
        _check(p, 0 <= self.warmup_start <= 1, f"warmup_start={self.warmup_start}: must be in [0, 1]")
        _check(p, 0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        _check(p, self.schedule in ("cosine", "constant"), f"schedule={self.schedule!r}: use 'cosine' or 'constant'")
        _check(p, self.grad_clip is None or self.grad_clip > 0, f"grad_clip={self.grad_clip}: must be > 0 or null")
        _raise_if(p)


@dataclass(frozen=True)
class AblateSpec:
    """Removing the forget slice after training."""

    __pydantic_config__ = _FORBID_EXTRA

    kind: AblationKind = AblationKind.ZERO
    seed: int = 0
    """Generator seed of the re-init draw."""


@dataclass(frozen=True)
class CalibrateSpec:
    """Post-ablation logit calibration: fit only the output bias (method-reference.md §7)."""

    __pydantic_config__ = _FORBID_EXTRA

    enabled: bool = True
    steps: int = 200
    lr: float = 1e-2
    final_lr_ratio: float = 0.1
    """The LR decays linearly from lr to lr * final_lr_ratio."""
    weight_decay: float = 0.01
    alpha: float = 100.0
    """Weight of the retain loss."""
    beta: float = 1.0
    """Weight of the adjacent loss (paper Wikipedia scripts: 100)."""
    bias_std: float = 0.1
    """Re-init the bias from N(0, bias_std) as the reference does; 0 starts from zeros."""
    batch_size: int = 8
    seed: int = 42

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.steps >= 0, f"steps={self.steps}: must be >= 0")
        _check(p, self.lr > 0, f"lr={self.lr}: must be > 0")
        _check(p, 0 < self.final_lr_ratio <= 1, f"final_lr_ratio={self.final_lr_ratio}: must be in (0, 1]")
        _check(p, self.alpha >= 0 and self.beta >= 0, f"alpha={self.alpha}, beta={self.beta}: must be >= 0")
        _check(p, self.bias_std >= 0, f"bias_std={self.bias_std}: must be >= 0")
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        _raise_if(p)


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: loss per split and category, plus capability measures beyond loss."""

    __pydantic_config__ = _FORBID_EXTRA

    batch_size: int = 16
    max_batches: int | None = None
    """Cap per (split, category); None = all held-out documents."""
    capability: bool = True
    """Top-1 accuracy, share of target language in samples (wiki-bilingual), cloze test (wiki-bio)."""
    n_samples: int = 32
    """Prompts sampled for the language-share measure."""
    sample_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        _check(p, self.max_batches is None or self.max_batches >= 1, f"max_batches={self.max_batches}: must be >= 1")
        _check(p, self.n_samples >= 0, f"n_samples={self.n_samples}: must be >= 0")
        _check(p, self.sample_tokens >= 1, f"sample_tokens={self.sample_tokens}: must be >= 1")
        _raise_if(p)


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how a stage runs; none of this changes the result beyond numerics."""

    __pydantic_config__ = _FORBID_EXTRA

    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    compile: bool = False
    threads: int | None = None
    """torch intra-op threads on CPU; None = torch's default."""
    def __post_init__(self) -> None:
        _raise_if([] if self.threads is None or self.threads >= 1 else [f"threads={self.threads}: must be >= 1"])


# ---------------------------------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class TrainSpec:
    """Pretraining with a localization strategy (or none), label noise and an optional filter."""

    __pydantic_config__ = _FORBID_EXTRA

    model: ModelSpec = field(default_factory=ModelSpec)
    masking: MaskingSpec = field(default_factory=MaskingSpec)
    data: DataSpec = field(default_factory=DataSpec)
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    filter: FilterSpec = field(default_factory=FilterSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per optimizer step (the logical batch, over all ranks)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward per rank; None = the whole per-rank batch (no accumulation)."""
    eval_every: int | None = None
    """Evaluate every N steps (and at the end); None = only at the end."""
    checkpoint_every: int | None = None
    """Checkpoint every N steps (and at the end); None = only at the end."""
    log_every: int = 10
    eval: EvalSpec = field(default_factory=EvalSpec)
    eval_ablated: bool = False
    """Also evaluate an ablated copy at every evaluation (trade-off curves); the model itself is untouched."""
    eval_calibrated: bool = False
    """Also evaluate a calibrated copy of the ablated model at every evaluation (costs calibrate.steps steps)."""
    ablate: AblateSpec = field(default_factory=AblateSpec)
    calibrate: CalibrateSpec = field(default_factory=CalibrateSpec)
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    seed: int = 0
    """Seeds the initialization and the data order."""

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.steps >= 1, f"steps={self.steps}: must be >= 1")
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        if self.micro_batch_size is not None:
            _check(p, self.micro_batch_size >= 1, f"micro_batch_size={self.micro_batch_size}: must be >= 1")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            _check(p, v is None or v >= 1, f"{name}={v}: must be >= 1 or null")
        _check(p, self.log_every >= 1, f"log_every={self.log_every}: must be >= 1")
        _check(p, self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size >= 1:
            _check(p, self.batch_size % self.micro_batch_size == 0,
                   f"micro_batch_size={self.micro_batch_size}: must divide batch_size={self.batch_size}")
        if self.data.conditional and self.noise.granularity != NoiseGranularity.DOCUMENT:
            p.append(f"data.conditional=true: control tokens follow each document's label; set "
                     f"noise.granularity='document' (got {self.noise.granularity.value!r})")
        if self.filter.kind != FilterKind.NONE and self.masking.strategy != Strategy.NONE:
            p.append(f"filter.kind={self.filter.kind.value}: filters are baselines for clean models; "
                     f"set masking.strategy='none' or filter.kind='none'")
        p += self.masking.problems_with(self.model)
        _raise_if(p)


def method_name(spec: TrainSpec) -> str:
    """A train spec's method label for tables and MLflow tags (sgtm, gradient_routing, weak_filter, no_filter, ...).

    Lives in the stdlib-only schema so that the engine and the API (which may not import the pipeline) share it.
    """
    if spec.masking.strategy != Strategy.NONE:
        return spec.masking.strategy.value
    if spec.data.conditional:
        return "conditional"
    return "no_filter" if spec.filter.kind == FilterKind.NONE else f"{spec.filter.kind.value}_filter"


@dataclass(frozen=True)
class EvaluateSpec:
    """Evaluate a model (its parent's output): unablated, ablated and calibrated."""

    __pydantic_config__ = _FORBID_EXTRA

    eval: EvalSpec = field(default_factory=EvalSpec)
    ablate: AblateSpec | None = field(default_factory=AblateSpec)
    """None skips the ablated and calibrated evaluations."""
    calibrate: CalibrateSpec = field(default_factory=CalibrateSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)


@dataclass(frozen=True)
class AblateStageSpec:
    """Write an ablated copy of the parent's model."""

    __pydantic_config__ = _FORBID_EXTRA

    ablate: AblateSpec = field(default_factory=AblateSpec)


def _attack_optim() -> OptimSpec:
    # method-reference.md §9.1: lr 2e-4, 200 warmup steps from 2e-5, cosine to 0, AdamW wd 0.1, betas (0.9, 0.95)
    return OptimSpec(lr=2e-4, warmup_steps=200, warmup_start=0.1, min_lr_ratio=0.0, weight_decay=0.1)


@dataclass(frozen=True)
class AttackSpec:
    """Adversarial fine-tuning of a parent model on its own training data (method-reference.md §9.1).

    The parent (a train, ablate or rmu stage) is ablated if it has a forget slice and is not ablated yet, then
    fine-tuned as a clean model: every parameter, stock forward, no masking. Defaults are the paper's.
    """

    __pydantic_config__ = _FORBID_EXTRA

    data: AttackData = AttackData.MIXTURE
    upsample_forget: float = 27.0
    """Forget factor of the mixture (retain and adjacent x1). The paper's x27 puts ~51% of steps on 3.7% biology;
    on wiki-bilingual (Spanish = 37% of rows) x1.7 gives 50/50. Ignored for forget_only."""
    ablate: AblateSpec | None = field(default_factory=AblateSpec)
    """Ablation of a parent that has a forget slice and is not ablated yet; null attacks it unablated."""
    optim: OptimSpec = field(default_factory=_attack_optim)
    steps: int = 1000
    batch_size: int = 8
    micro_batch_size: int | None = None
    eval_every: int = 25
    """Evaluate at step 0, every N steps and at the end (the paper: 25)."""
    eval: EvalSpec = field(default_factory=lambda: EvalSpec(capability=False))
    """Held-out evaluation along the curve; capability (if on) is measured at the last evaluation only."""
    reference_forget_loss: float | None = None
    """The no-filter baseline's final uncalibrated forget loss; null reads it from the `baseline` input's result."""
    forget_category: str | None = None
    """Compare this forget category's loss instead of the split mean (the paper: STEM.Biology)."""
    log_every: int = 10
    save_model: bool = True
    """Write the attacked model (`artifacts.model`)."""
    seed: int = 0
    """Seeds the attack's data order."""
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.upsample_forget > 0 and math.isfinite(self.upsample_forget),
               f"upsample_forget={self.upsample_forget}: must be > 0")
        _check(p, self.steps >= 1, f"steps={self.steps}: must be >= 1")
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        if self.micro_batch_size is not None:
            _check(p, self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size == 0,
                   f"micro_batch_size={self.micro_batch_size}: must be >= 1 and divide batch_size={self.batch_size}")
        _check(p, self.eval_every >= 1, f"eval_every={self.eval_every}: must be >= 1")
        _check(p, self.log_every >= 1, f"log_every={self.log_every}: must be >= 1")
        if self.reference_forget_loss is not None:
            _check(p, math.isfinite(self.reference_forget_loss) and self.reference_forget_loss > 0,
                   f"reference_forget_loss={self.reference_forget_loss}: must be a positive loss or null")
        _check(p, self.forget_category is None or bool(self.forget_category),
               "forget_category='': name a forget category or use null (the split mean)")
        _raise_if(p)


@dataclass(frozen=True)
class RmuSpec:
    """RMU unlearning (method-reference.md §9.2); defaults are the paper's (SGTM repo: WMDP's alpha and c)."""

    __pydantic_config__ = _FORBID_EXTRA

    layer_id: int | None = None
    """Block whose output hidden state is steered (0-based); null = n_layer // 2 - 1 (the paper: 7 of 16)."""
    param_patterns: tuple[str, ...] | None = None
    """Parameters to update, by name: a pattern selects a parameter equal to it, below it as a module prefix
    (`transformer.h.5.mlp`), or matching it as a glob (`transformer.h.*.mlp.c_proj.weight`). Null = the MLPs of
    blocks layer_id-2 .. layer_id (the paper: 5, 6, 7)."""
    steering_coef: float = 20.0
    """c: the forget activations are pushed to c * u / |u|, u ~ Uniform[0, 1)^d."""
    alpha: float = 100.0
    """Weight of the retain term (mean squared distance to the frozen model's activations)."""
    steps: int = 250
    """The paper's table says 250; its script runs 240."""
    batch_size: int = 4
    """Rows per forget batch and per retain batch (the paper: 4 x 1,024 tokens)."""
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    """torch's AdamW defaults, as the reference."""
    log_every: int = 10
    eval: EvalSpec = field(default_factory=lambda: EvalSpec(capability=False))
    """Final evaluation of the unlearned model (uncalibrated, as the paper's)."""
    seed: int = 42
    """Seeds the control vector and the data order."""
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.layer_id is None or self.layer_id >= 0, f"layer_id={self.layer_id}: must be >= 0 or null")
        if self.param_patterns is not None:
            _check(p, len(self.param_patterns) > 0 and all(self.param_patterns),
                   f"param_patterns={list(self.param_patterns)}: give at least one non-empty pattern, or null")
        _check(p, self.steering_coef > 0, f"steering_coef={self.steering_coef}: must be > 0")
        _check(p, self.alpha >= 0, f"alpha={self.alpha}: must be >= 0")
        _check(p, self.steps >= 1, f"steps={self.steps}: must be >= 1")
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        _check(p, self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr}: must be > 0")
        _check(p, self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0")
        _check(p, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"betas={list(self.betas)}: need two values in [0, 1)")
        _check(p, self.log_every >= 1, f"log_every={self.log_every}: must be >= 1")
        _raise_if(p)


T = TypeVar("T")

STAGE_SPECS: dict[StageKind, type] = {
    StageKind.TRAIN: TrainSpec,
    StageKind.ABLATE: AblateStageSpec,
    StageKind.EVALUATE: EvaluateSpec,
    StageKind.ATTACK: AttackSpec,
    StageKind.RMU: RmuSpec,
}
"""Spec class per stage kind."""


# ---------------------------------------------------------------------------------------------------------------------
# dict <-> spec


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build a spec from plain data (YAML/JSON), reporting every problem at once with dotted field paths."""
    problems: list[str] = []
    value = _convert(cls, data, path, problems)
    _raise_if(problems)
    return typing.cast(T, value)


def _convert(tp: Any, data: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    where = path or "<root>"
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, data, path, problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], data, path, problems)
        problems.append(f"{where}: unsupported union type {tp}")
        return None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, (list, tuple)):
            problems.append(f"{where}={data!r}: expected a list")
            return None
        item_types = [args[0]] * len(data) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(data):
            problems.append(f"{where}={list(data)!r}: expected {len(item_types)} items")
            return None
        pairs = enumerate(zip(item_types, data, strict=True))
        return tuple(_convert(t, d, f"{path}[{i}]", problems) for i, (t, d) in pairs)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            problems.append(f"{where}={data!r}: must be one of {[m.value for m in tp]}")
            return None
    if tp is bool:
        if not isinstance(data, bool):
            problems.append(f"{where}={data!r}: expected true or false")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            if isinstance(data, float) and data.is_integer():
                return int(data)
            problems.append(f"{where}={data!r}: expected an integer")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            problems.append(f"{where}={data!r}: expected a number")
            return data
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            problems.append(f"{where}={data!r}: expected a string")
        return data
    if tp is Any:
        return data
    problems.append(f"{where}: unsupported field type {tp}")
    return None


def _convert_dataclass(cls: Any, data: Any, path: str, problems: list[str]) -> Any:
    if isinstance(data, cls):
        return data
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}={data!r}: expected a mapping of {cls.__name__} fields")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown field of {cls.__name__}; known fields: {sorted(names)}")
    kwargs = {}
    failed = False
    for name in names & set(data):
        before = len(problems)
        value = _convert(hints[name], data[name], f"{prefix}{name}", problems)
        if len(problems) == before:
            kwargs[name] = value
        else:
            failed = True  # leave the default in place so the other fields are still validated
    try:
        built = cls(**kwargs)
    except ConfigError as e:
        problems.extend(f"{prefix}{m}" for m in e.problems)
        return None
    return None if failed else built


def to_dict(spec: Any) -> Any:
    """Plain JSON-able data from a spec (enums as their values, tuples as lists)."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return {f.name: to_dict(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    if isinstance(spec, enum.Enum):
        return spec.value
    if isinstance(spec, (list, tuple)):
        return [to_dict(x) for x in spec]
    if isinstance(spec, dict):
        return {k: to_dict(v) for k, v in spec.items()}
    return spec


def spec_hash(spec: Any) -> str:
    """A stable content hash of a spec (sha256 of its canonical JSON), used to dedupe jobs and sweep cells."""
    blob = json.dumps(to_dict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def with_overrides(cls: type[T], data: dict[str, Any], overrides: dict[str, Any]) -> T:
    """Apply dotted-path overrides (`optim.lr=3e-4`) to plain data, then build and validate the spec."""
    merged = json.loads(json.dumps(data))
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {key!r} is not a mapping")
            node = child
        node[leaf] = value
    return from_dict(cls, merged)


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'n_layer': 2}} -> {'model.n_layer': '2'}; lists as JSON, everything else `str()`.

    The one rendering of a spec as MLflow params, shared by the engine's tracker and the service's supervisor:
    both log the spec into the same run, and MLflow accepts a param logged twice only if the value is identical.
    """
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out
