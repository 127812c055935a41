"""Stage lists: the one parser of `[{name, kind, spec, inputs, queue, gpus}, ...]`, for `sgtm run` recipes, the
API's pipeline body and a sweep's base, so a list one of them accepts the others accept too.

Rules (every problem reported at once, located under `("stages", i, ...)`):
- `name`: 1-32 characters, lowercase letters, digits, `_` or `-`, starting with a letter (`STAGE_NAME_PATTERN`;
  shorter than a job id, so the two are never confused), unique in the list.
- `kind`: a `StageKind`; `spec`: a mapping validated by that kind's spec class.
- `inputs`: `{input name: earlier stage}`; each kind takes the inputs of `STAGE_INPUTS` (required, optional), and a
  `model` input must come from a stage that produces a model. The API also lets an input name an existing job: it
  passes `external`, which says whether a reference that is no stage of the list may stand (the API checks the job).
- `queue` (gpu, cpu or null) and `gpus` (1-8) say where a stage runs under the service; a local run ignores them.
  Only train and attack stages split their batches over GPUs; the others, and a stage on CPU (queue cpu, or
  spec.runtime.device cpu), run as one process: gpus 1. (A service whose default queue is cpu refuses gpus > 1 for
  any stage that names no queue: that depends on the deployment, not the recipe.)
- Overrides address a stage by name: `train.optim.lr` sets a spec field, `evaluate.inputs.model` an input.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sgtm_engine.config.convert import did_you_mean, from_dict, unknown_choice, unknown_key
from sgtm_engine.config.overrides import set_path
from sgtm_engine.config.stages import STAGE_SPECS
from sgtm_engine.config.vocabulary import Device, StageKind
from sgtm_engine.errors import ConfigError, Loc, Problem

STAGE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
INPUT_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
STAGE_NAME_RULE = "use 1-32 characters: lowercase letters, digits, '_' or '-', starting with a letter"
EXPERIMENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
EXPERIMENT_NAME_RULE = ("an MLflow experiment name: 1-128 letters, digits, '_', '-' or '.', starting with a letter or "
                        "digit")
MAX_DESCRIPTION = 4000
STAGE_KEYS = ("name", "kind", "spec", "inputs", "queue", "gpus")
RECIPE_KEYS = ("name", "description", "experiment", "stages")
MAX_STAGES = 64
QUEUES = ("gpu", "cpu")

#: Inputs each stage kind reads from its parents: (required, optional). `model` is the model the stage starts from;
#: an attack's optional `baseline` is the no-filter run whose forget loss defines "recovered" (AttackSpec).
STAGE_INPUTS: dict[StageKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    StageKind.TRAIN: ((), ()),
    StageKind.ABLATE: (("model",), ()),
    StageKind.EVALUATE: (("model",), ()),
    StageKind.ATTACK: (("model",), ("baseline",)),
    StageKind.RMU: (("model",), ()),
}
#: Kinds whose output is a model (may feed a `model` input).
MODEL_PRODUCERS = frozenset({StageKind.TRAIN, StageKind.ABLATE, StageKind.ATTACK, StageKind.RMU})
#: Kinds that split their batches over torchrun's ranks (`gpus` > 1); the others run as one process.
DATA_PARALLEL = frozenset({StageKind.TRAIN, StageKind.ATTACK})

# fullmatch, not match: `$` also matches before a final newline, which the API's patterns refuse
_NAME, _EXPERIMENT = re.compile(STAGE_NAME_PATTERN), re.compile(EXPERIMENT_NAME_PATTERN)


@dataclass(frozen=True)
class Stage:
    name: str
    kind: StageKind
    spec: Any
    """The validated spec (an instance of `STAGE_SPECS[kind]`)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Input name -> an earlier stage's name (or, through the API, an existing job id)."""
    queue: str | None = None
    gpus: int = 1


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    experiment: str | None = None


def parse_recipe(data: Any, overrides: Mapping[str, Any] | None = None, *,
                 external: Callable[[str], bool] | None = None) -> Recipe:
    """Validate a recipe document (`name`, `description`, `experiment`, `stages`) after applying stage overrides."""
    if not isinstance(data, dict):
        raise ConfigError(Problem.at((), "a recipe is a mapping with a 'stages' list: {name, stages: [{name, kind, "
                                         "spec, inputs}]}"))
    unknown = [str(k) for k in data if k not in RECIPE_KEYS]
    problems = [unknown_key((), k, RECIPE_KEYS, "a recipe") for k in unknown] + header_problems(data)
    stages: list[Stage] = []
    if "stages" in data or "stages" not in {did_you_mean(k, RECIPE_KEYS) for k in unknown}:  # no follow-on error
        try:
            stages = parse_stages(data.get("stages"), overrides, external=external)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return Recipe(data.get("name", "recipe"), tuple(stages), data.get("description") or "", data.get("experiment"))


def header_problems(data: Mapping[str, Any]) -> list[Problem]:
    """The fields a recipe and a sweep document share, by one rule for `sgtm run`, `sgtm sweep` and the API's
    bodies: `name` (like a stage's), `description` (free text) and `experiment` (where MLflow files the runs)."""
    problems = []
    if "name" in data and (not isinstance(data["name"], str) or not _NAME.fullmatch(data["name"])):
        problems.append(Problem.at(("name",), STAGE_NAME_RULE, data["name"]))
    description = data.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION):
        problems.append(Problem.at(("description",), f"free text of at most {MAX_DESCRIPTION} characters, or null",
                                   description))
    experiment = data.get("experiment")
    if experiment is not None and (not isinstance(experiment, str) or not _EXPERIMENT.fullmatch(experiment)):
        problems.append(Problem.at(("experiment",), f"{EXPERIMENT_NAME_RULE}; or null for the default", experiment))
    return problems


def _set_option(path: str) -> tuple[Loc, str]:
    return ("--set", path), f"--set {path}"


def apply_stage_overrides(stages: Any, overrides: Mapping[str, Any],
                          where: Callable[[str], tuple[Loc, str]] = _set_option) -> list[dict[str, Any]]:
    """A copy of a raw stage list with `STAGE.field.path=value` overrides applied (`STAGE.inputs.NAME` re-points an
    input); an override naming no stage is a problem with a did-you-mean. `where(path)`: the location and label of
    an override's problems (default: the `--set` option)."""
    problems: list[Problem] = []
    out = _override(stages, overrides, problems, where)
    if problems:
        raise ConfigError(problems)
    return out


def _override(stages: Any, overrides: Mapping[str, Any], problems: list[Problem],
              where: Callable[[str], tuple[Loc, str]] = _set_option) -> list[Any]:
    # set_path writes into nested blocks: each stage its own copy, also of blocks YAML anchors share between stages
    raw = [copy.deepcopy(s) for s in stages] if isinstance(stages, list) else []
    by_name = {s.get("name"): s for s in raw if isinstance(s, dict)}
    for path, value in overrides.items():
        stage_name, _, rest = path.partition(".")
        stage = by_name.get(stage_name)
        if stage is None or not rest:
            names = sorted(str(n) for n in by_name)
            guess = did_you_mean(stage_name, names)
            hint = f"did you mean '{guess}.{rest}'?" if guess and rest else f"stages: {names}"
            if stage is None:
                what = f"no stage named {stage_name!r}; {hint}"
            else:
                what = f"names a whole stage; set a field of it, e.g. '{stage_name}.steps'"
            loc, label = where(path)
            problems.append(Problem(loc, f"{label}: {what}"))
            continue
        target = "inputs" if rest.startswith("inputs.") else "spec"
        block = stage[target] = dict(stage.get(target) or {})
        try:
            set_path(block, rest.removeprefix("inputs.") if target == "inputs" else rest, value)
        except ConfigError as e:
            loc, label = where(path)
            problems += [Problem(loc, f"{label}: {p.msg}", value) for p in e.problems]
    return raw


def parse_stages(stages: Any, overrides: Mapping[str, Any] | None = None, *,
                 external: Callable[[str], bool] | None = None, validate_specs: bool = True) -> list[Stage]:
    """Validate a raw stage list (see the module doc) and build every stage's spec; every problem at once.

    Args:
        stages: the raw list, as read from YAML or JSON.
        overrides: `{"STAGE.field.path": value}` applied first (`apply_stage_overrides`).
        external: whether an input reference that names no stage of the list may stand (the API: a job id).
        validate_specs: False keeps each spec as the raw mapping (a sweep validates its cells after overriding).
    """
    if not isinstance(stages, list) or not stages:
        raise ConfigError(Problem.at(("stages",), "needs a non-empty list of stages: [{name, kind, spec, inputs}]",
                                     stages))
    problems: list[Problem] = []
    if len(stages) > MAX_STAGES:
        problems.append(Problem.at(("stages",), f"has {len(stages)} stages; at most {MAX_STAGES}"))
    if overrides:
        stages = _override(stages, overrides, problems)
    out: list[Stage] = []
    kinds: dict[str, StageKind | None] = {}  # every stage seen so far, by name (None: its kind is invalid)
    names = {s.get("name") for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)}
    for i, raw in enumerate(stages):
        before = len(problems)
        stage = _parse_stage(raw, ("stages", i), kinds, names - set(kinds), external, validate_specs, problems)
        if stage is not None and len(problems) == before:
            out.append(stage)
    if problems:
        raise ConfigError(problems)
    return out


def _parse_stage(raw: Any, loc: Loc, kinds: dict[str, StageKind | None], later: set[str],
                 external: Callable[[str], bool] | None, validate_spec: bool, problems: list[Problem]
                 ) -> Stage | None:
    if not isinstance(raw, dict):
        problems.append(Problem.at(loc, "expected a mapping {name, kind, spec, inputs}", raw))
        return None
    unknown = [str(k) for k in raw if k not in STAGE_KEYS]
    problems += [unknown_key(loc, k, STAGE_KEYS, "a stage") for k in unknown]
    meant = {did_you_mean(k, STAGE_KEYS) for k in unknown}  # a typo'd key is not also a missing one
    name, kind = raw.get("name"), raw.get("kind")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        if "name" not in meant:
            problems.append(Problem.at(loc + ("name",), f"every stage needs a name; {STAGE_NAME_RULE}", name))
        return None
    if name in kinds:
        problems.append(Problem.at(loc + ("name",), "already used by an earlier stage; stage names must be unique",
                                   name))
        return None
    kinds[name] = None
    try:
        kind = StageKind(kind)
    except ValueError:
        if "kind" not in meant:
            problems.append(unknown_choice(loc + ("kind",), kind, [k.value for k in StageKind]))
        return None
    mine: list[Problem] = []  # located below the stage, written with its name: `train.optim.lr=-1: ...`
    inputs = _parse_inputs(raw.get("inputs"), kind, kinds, later, external, mine)
    queue, gpus = raw.get("queue"), raw.get("gpus", 1)
    if queue is not None and queue not in QUEUES:
        mine.append(Problem.at(("queue",), "'gpu', 'cpu' or null (cpu when spec.runtime.device is cpu)", queue))
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= 8:
        mine.append(Problem.at(("gpus",), "an integer in [1, 8]", gpus))
    else:
        mine += gpus_problems(kind, gpus)
    problems += [p.nested(loc, label=name) for p in mine]
    kinds[name] = kind
    spec = raw.get("spec") or {}
    if not isinstance(spec, dict):
        problems.append(Problem.at(loc + ("spec",), f"expected a mapping of {STAGE_SPECS[kind].__name__} fields",
                                   spec))
        return None
    if not validate_spec:
        return Stage(name, kind, spec, inputs, queue, gpus)
    try:
        spec = from_dict(STAGE_SPECS[kind], spec)
    except ConfigError as e:
        problems += [p.nested(loc + ("spec",), label=name) for p in e.problems]
        return None
    runtime = getattr(spec, "runtime", None)
    on_cpu = queue == "cpu" or (runtime is not None and runtime.device == Device.CPU)
    if isinstance(gpus, int) and gpus > 1 and on_cpu:
        problems.append(Problem.at(("gpus",), "a stage on the cpu queue (or with spec.runtime.device cpu) runs as "
                                              "one process; use gpus=1, or queue 'gpu'", gpus).nested(loc, label=name))
        return None
    return Stage(name, kind, spec, inputs, queue, gpus)


def gpus_problems(kind: StageKind, gpus: int) -> list[Problem]:
    """More than one GPU for a stage that does not split its batches over ranks (every rank would do the whole
    stage, and write the same files). Located at `("gpus",)`."""
    if gpus > 1 and kind not in DATA_PARALLEL:
        return [Problem.at(("gpus",), f"{_a(kind)} stage runs as one process (train and attack stages split their "
                                      "batches over GPUs); use gpus=1", gpus)]
    return []


def input_role_problems(kind: StageKind, inputs: Mapping[str, str]) -> list[Problem]:
    """The inputs a stage of `kind` is given against those it takes (`STAGE_INPUTS`): a missing required one, an
    unknown one (with a did-you-mean, and then not also 'missing'). Located at `("inputs", role)`."""
    required, optional = STAGE_INPUTS[kind]
    allowed = required + optional
    meant = {role: did_you_mean(role, allowed) for role in inputs if role not in allowed}
    problems = [Problem.at(("inputs", role), f"{_a(kind)} stage needs its '{role}' input (the name of an earlier "
                                             "stage, or a job id, that produced it)")
                for role in required if role not in inputs and role not in meant.values()]
    for role, hint in meant.items():
        hint = f"did you mean {hint!r}?" if hint else f"it takes {list(allowed) or 'none'}"
        problems.append(Problem.at(("inputs", role), f"{_a(kind)} stage takes no '{role}' input; {hint}",
                                   inputs[role]))
    return problems


def _a(kind: StageKind) -> str:
    return f"{'an' if kind.value[0] in 'aeiou' else 'a'} {kind.value}"


def _parse_inputs(raw: Any, kind: StageKind, kinds: dict[str, StageKind | None], later: set[str],
                  external: Callable[[str], bool] | None, problems: list[Problem]) -> dict[str, str]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        problems.append(Problem.at(("inputs",), "expected {input name: earlier stage name}", raw))
        return {}
    problems += input_role_problems(kind, raw)
    required, optional = STAGE_INPUTS[kind]
    for role, parent in raw.items():
        loc = ("inputs", role)
        if role not in required + optional:
            continue
        if parent in kinds:
            made_by = kinds[parent]
            if role == "model" and made_by is not None and made_by not in MODEL_PRODUCERS:
                problems.append(Problem.at(loc, f"{_a(made_by)} stage produces no model; use a "
                                                f"{sorted(k.value for k in MODEL_PRODUCERS)} stage", parent))
        elif parent in later:
            problems.append(Problem.at(loc, "names a later stage (or itself); list stages in the order they run",
                                       parent))
        elif external is None or not external(parent):
            guess = did_you_mean(parent, kinds)
            hint = f"; did you mean {guess!r}?" if guess else f"; earlier stages: {sorted(kinds)}"
            problems.append(Problem.at(loc, "must name an earlier stage" + hint, parent))
    return dict(raw)
