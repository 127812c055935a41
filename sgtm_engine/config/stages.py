"""The stage specs, one per `StageKind` (`STAGE_SPECS`): what a train, ablate, evaluate, attack or RMU stage does.

Defaults are the paper's (docs/method.md); checks that span sub-specs (a filter needs a clean model, the forget
slice must fit the model) live in the stage spec that holds both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sgtm_engine.config.checks import FORBID_EXTRA, Checks
from sgtm_engine.config.data import DataSpec, FilterSpec, NoiseSpec
from sgtm_engine.config.model import MaskingSpec, ModelSpec
from sgtm_engine.config.specs import AblateSpec, CalibrateSpec, EvalSpec, OptimSpec, RuntimeSpec
from sgtm_engine.config.vocabulary import AttackData, FilterKind, NoiseGranularity, StageKind, Strategy

NOT_COMPILED = "compiles the training step of train and attack stages; {kind} stage has none: set false"


@dataclass(frozen=True)
class TrainSpec:
    """Pretraining with a localization strategy (or none), label noise and an optional filter."""

    __pydantic_config__ = FORBID_EXTRA

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
    register: str | None = None
    """Register this stage's model in the MLflow model registry under this name (a new version per run); null logs
    the model without registering it."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.registered_name("register")
        c.bound("steps", "batch_size", "log_every", "keep_checkpoints", ge=1)
        c.bound("micro_batch_size", "eval_every", "checkpoint_every", ge=1, nullable=True)
        if self.micro_batch_size is not None and self.micro_batch_size >= 1:
            c.require(self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
                      f"must divide batch_size={self.batch_size}", reads=("batch_size",))
        if self.data.conditional:
            c.require(self.noise.granularity == NoiseGranularity.DOCUMENT, ("data", "conditional"),
                      "control tokens follow each document's label; set noise.granularity='document' "
                      f"(got {self.noise.granularity.value!r})", value=True, reads=("noise",))
        if self.filter.kind != FilterKind.NONE:
            c.require(self.masking.strategy == Strategy.NONE, ("filter", "kind"), "filters are baselines for clean "
                      "models; set masking.strategy='none' or filter.kind='none'", value=self.filter.kind,
                      reads=("masking",))
        c.extend(self.masking.problems_with(self.model), reads=("masking", "model"))
        c.done()


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

    __pydantic_config__ = FORBID_EXTRA

    eval: EvalSpec = field(default_factory=EvalSpec)
    ablate: AblateSpec | None = field(default_factory=AblateSpec)
    """None skips the ablated and calibrated evaluations."""
    calibrate: CalibrateSpec = field(default_factory=CalibrateSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    register: str | None = None
    """Register this stage's model in the MLflow model registry under this name (a new version per run); null logs
    the model without registering it. The model is the calibrated one (ablated, with
    its calibrated output bias); an evaluation that does not calibrate has none."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.registered_name("register")
        c.require(self.register is None or (self.ablate is not None and self.calibrate.enabled
                                            and self.calibrate.steps > 0), "register",
                  "only a calibrating evaluation writes a model; set ablate and calibrate.steps > 0, or null",
                  reads=("ablate", "calibrate"))
        c.require(not self.runtime.compile, ("runtime", "compile"), NOT_COMPILED.format(kind="an evaluate"),
                  reads=("runtime",), value=True)
        c.done()


@dataclass(frozen=True)
class AblateStageSpec:
    """Write an ablated copy of the parent's model."""

    __pydantic_config__ = FORBID_EXTRA

    ablate: AblateSpec = field(default_factory=AblateSpec)
    register: str | None = None
    """Register this stage's model in the MLflow model registry under this name (a new version per run); null logs
    the model without registering it."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.registered_name("register")
        c.done()


def _attack_optim() -> OptimSpec:
    # The paper's attack (§5.3): lr 2e-4, 200 warmup steps from 2e-5, cosine to 0, AdamW wd 0.1, betas (0.9, 0.95)
    return OptimSpec(lr=2e-4, warmup_steps=200, warmup_start=0.1, min_lr_ratio=0.0, weight_decay=0.1)


@dataclass(frozen=True)
class AttackSpec:
    """Adversarial fine-tuning of a parent model on its own training data (docs/method.md §12; paper §5.3).

    The parent (a train, ablate or rmu stage) is ablated if it has a forget slice and is not ablated yet, then
    fine-tuned as a clean model: every parameter, stock forward, no masking. Defaults are the paper's.
    """

    __pydantic_config__ = FORBID_EXTRA

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
    register: str | None = None
    """Register this stage's model in the MLflow model registry under this name (a new version per run); null logs
    the model without registering it. Needs save_model."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.registered_name("register")
        c.require(self.register is None or self.save_model, "register", "the attacked model is saved only with "
                  "save_model=true; set it, or null", reads=("save_model",))
        c.bound("upsample_forget", gt=0)
        c.bound("steps", "batch_size", "eval_every", "log_every", ge=1)
        c.bound("micro_batch_size", ge=1, nullable=True)
        if self.micro_batch_size is not None and self.micro_batch_size >= 1:
            c.require(self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
                      f"must divide batch_size={self.batch_size}", reads=("batch_size",))
        c.bound("reference_forget_loss", gt=0, nullable=True, fix=" (a loss)")
        c.require(self.forget_category is None or bool(self.forget_category), "forget_category",
                  "name a forget category or use null (the split mean)")
        c.done()


@dataclass(frozen=True)
class RmuSpec:
    """RMU unlearning (docs/method.md §13; paper App. J.2); defaults are the paper's (WMDP's alpha and c)."""

    __pydantic_config__ = FORBID_EXTRA

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
    register: str | None = None
    """Register this stage's model in the MLflow model registry under this name (a new version per run); null logs
    the model without registering it."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.registered_name("register")
        c.bound("layer_id", ge=0, nullable=True)
        if self.param_patterns is not None:
            c.require(len(self.param_patterns) > 0 and all(self.param_patterns), "param_patterns",
                      "give at least one non-empty pattern, or null", value=list(self.param_patterns))
        c.bound("steering_coef", "lr", gt=0)
        c.bound("alpha", "weight_decay", ge=0)
        c.bound("steps", "batch_size", "log_every", ge=1)
        c.bound("betas", ge=0, lt=1)
        c.require(len(self.betas) == 2, "betas", "need two values (beta1, beta2)")
        c.require(not self.runtime.compile, ("runtime", "compile"), NOT_COMPILED.format(kind="an rmu"),
                  reads=("runtime",), value=True)
        c.done()


STAGE_SPECS: dict[StageKind, type] = {
    StageKind.TRAIN: TrainSpec,
    StageKind.ABLATE: AblateStageSpec,
    StageKind.EVALUATE: EvaluateSpec,
    StageKind.ATTACK: AttackSpec,
    StageKind.RMU: RmuSpec,
}
"""Spec class per stage kind."""
