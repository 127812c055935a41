"""The pieces stages share: the optimizer and its schedule, ablation, logit calibration, held-out evaluation, and
where a stage runs (`RuntimeSpec`)."""

from __future__ import annotations

from dataclasses import dataclass

from sgtm_engine.config.checks import FORBID_EXTRA, Checks
from sgtm_engine.config.vocabulary import AblationKind, Device, Precision


@dataclass(frozen=True)
class OptimSpec:
    """AdamW and its schedule: linear warmup from warmup_start * lr, then cosine to min_lr_ratio * lr."""

    __pydantic_config__ = FORBID_EXTRA

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
        c = Checks(self)
        c.bound("lr", "eps", gt=0)
        c.bound("betas", ge=0, lt=1)
        c.require(len(self.betas) == 2, "betas", "need two values (beta1, beta2)")
        c.bound("weight_decay", "warmup_steps", ge=0)
        c.bound("warmup_start", "min_lr_ratio", ge=0, le=1)
        c.require(self.schedule in ("cosine", "constant"), "schedule", "use 'cosine' or 'constant'")
        c.bound("grad_clip", gt=0, nullable=True)
        c.done()


@dataclass(frozen=True)
class AblateSpec:
    """Removing the forget slice after training."""

    __pydantic_config__ = FORBID_EXTRA

    kind: AblationKind = AblationKind.ZERO
    seed: int = 0
    """Generator seed of the re-init draw."""


@dataclass(frozen=True)
class CalibrateSpec:
    """Post-ablation logit calibration: fit only the output bias (docs/method.md §10)."""

    __pydantic_config__ = FORBID_EXTRA

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
        c = Checks(self)
        c.bound("steps", "alpha", "beta", "bias_std", ge=0)
        c.bound("lr", gt=0)
        c.bound("final_lr_ratio", gt=0, le=1)
        c.bound("batch_size", ge=1)
        c.done()


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: loss per split and category, plus capability measures beyond loss."""

    __pydantic_config__ = FORBID_EXTRA

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
        c = Checks(self)
        c.bound("batch_size", "sample_tokens", ge=1)
        c.bound("max_batches", ge=1, nullable=True)
        c.bound("n_samples", ge=0)
        c.done()


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how a stage runs; none of this changes the result beyond numerics."""

    __pydantic_config__ = FORBID_EXTRA

    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    compile: bool = False
    """`torch.compile` the training step's forward and backward (train and attack stages; a graph per masking mode,
    compiled at its first step). torch's compiler builds kernels with a host compiler (C++ on a CPU, C for Triton on
    a GPU); a stage asking to compile where there is none is refused before it runs."""
    threads: int | None = None
    """torch intra-op threads on CPU; None = torch's default."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.bound("threads", ge=1, nullable=True)
        c.done()

