"""One config schema for the CLI, YAML recipes and the REST body: frozen stdlib dataclasses, no torch.

The package, by concern (every public name is re-exported here, so `from sgtm_engine.config import X` is the import):
- `vocabulary`: the enums every spec speaks (`Split`, `MaskMode`, `Strategy`, `StageKind`, ...).
- `model`: the model's shape and its forget slice (`ModelSpec`, `MODEL_PRESETS`, `MaskingSpec`).
- `data`: corpus, label noise and filters (`DataSpec`, `NoiseSpec`, `FilterSpec`).
- `specs`: what stages share (`OptimSpec`, `AblateSpec`, `CalibrateSpec`, `EvalSpec`, `RuntimeSpec`).
- `stages`: one spec per stage kind (`TrainSpec`, `EvaluateSpec`, `AttackSpec`, `RmuSpec`, ..., `STAGE_SPECS`).
- `convert`: plain data <-> specs (`from_dict`, `to_dict`, `spec_hash`, `flat_params`).
- `overrides`: the one deep merge and dotted-path setter (`merge`, `set_path`, `apply_overrides`, `with_overrides`).
- `stage_list`: the one parser of stage lists for recipes, the API's pipelines and sweeps (`parse_stages`,
  `parse_recipe`, `apply_stage_overrides`).
- `checks`: how specs validate themselves (one `Checks` collector; every bound through `Checks.bound`).

Every problem is a `Problem(loc, msg, value)` carried by `ConfigError.problems`, reported all at once, naming the
field, the value and the fix. YAML (files, `--set` values, `--print-config`) is `sgtm_engine.yamlio`: this package is
stdlib-only because the API imports it.
"""

from sgtm_engine.config.checks import FORBID_EXTRA, Checks
from sgtm_engine.config.convert import (
    did_you_mean,
    flat_params,
    from_dict,
    spec_hash,
    to_dict,
    unknown_choice,
    unknown_key,
)
from sgtm_engine.config.data import BUILTIN_CORPORA, TOKENIZERS, DataSpec, FilterSpec, NoiseSpec, unknown_corpora
from sgtm_engine.config.model import MODEL_PRESETS, MaskingSpec, ModelSpec
from sgtm_engine.config.overrides import apply_overrides, merge, set_path, with_overrides
from sgtm_engine.config.specs import AblateSpec, CalibrateSpec, EvalSpec, OptimSpec, RuntimeSpec
from sgtm_engine.config.stage_list import (
    EXPERIMENT_NAME_PATTERN,
    EXPERIMENT_NAME_RULE,
    INPUT_NAME_PATTERN,
    MAX_DESCRIPTION,
    MAX_STAGES,
    MODEL_PRODUCERS,
    STAGE_INPUTS,
    STAGE_NAME_PATTERN,
    STAGE_NAME_RULE,
    Recipe,
    Stage,
    apply_stage_overrides,
    gpus_problems,
    header_problems,
    input_role_problems,
    parse_recipe,
    parse_stages,
)
from sgtm_engine.config.stages import (
    STAGE_SPECS,
    AblateStageSpec,
    AttackSpec,
    EvaluateSpec,
    RmuSpec,
    TrainSpec,
    method_name,
)
from sgtm_engine.config.vocabulary import (
    AblationKind,
    AttackData,
    Device,
    FalsePositiveSource,
    FilterKind,
    FilterMatching,
    MaskMode,
    NoiseGranularity,
    NoiseModel,
    OptimizerKind,
    Precision,
    Split,
    StageKind,
    Strategy,
)
from sgtm_engine.errors import ConfigError, Problem

__all__ = [
    "BUILTIN_CORPORA", "EXPERIMENT_NAME_PATTERN", "EXPERIMENT_NAME_RULE", "FORBID_EXTRA", "INPUT_NAME_PATTERN",
    "MAX_DESCRIPTION", "MAX_STAGES", "MODEL_PRESETS", "MODEL_PRODUCERS",
    "STAGE_INPUTS", "STAGE_NAME_PATTERN", "STAGE_NAME_RULE", "STAGE_SPECS", "TOKENIZERS", "AblateSpec",
    "AblateStageSpec", "AblationKind", "AttackData", "AttackSpec", "CalibrateSpec", "Checks", "ConfigError",
    "DataSpec", "Device", "EvalSpec", "EvaluateSpec", "FalsePositiveSource", "FilterKind", "FilterMatching",
    "FilterSpec", "MaskMode", "MaskingSpec", "ModelSpec", "NoiseGranularity", "NoiseModel", "NoiseSpec",
    "OptimSpec", "OptimizerKind", "Precision", "Problem", "Recipe", "RmuSpec", "RuntimeSpec", "Split", "Stage",
    "StageKind", "Strategy", "TrainSpec", "apply_overrides", "apply_stage_overrides", "did_you_mean", "flat_params",
    "from_dict", "gpus_problems", "header_problems", "input_role_problems", "merge", "method_name", "parse_recipe",
    "parse_stages", "set_path", "spec_hash", "to_dict", "unknown_choice", "unknown_corpora", "unknown_key",
    "with_overrides",
]
