"""Request and response bodies (`*Create` / `*Read`). Table models live in `api.db.models`, not here.

Every string a client sends is constrained by a pattern: ids are UUIDs, names are short slugs, and the stage spec is
checked field by field in `api.specs` — no field anywhere takes a path, a URL or a command.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, WithJsonSchema

from api.db.status import JobStatus
from sgtm_engine.config import (
    EXPERIMENT_NAME_PATTERN,
    EXPERIMENT_NAME_RULE,
    INPUT_NAME_PATTERN,
    MAX_DESCRIPTION,
    MAX_STAGES,
    STAGE_NAME_PATTERN,
    STAGE_NAME_RULE,
    STAGE_SPECS,
    StageKind,
)

UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
JobId = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]
_UUID = re.compile(UUID_PATTERN)
StageName = Annotated[str, StringConstraints(pattern=STAGE_NAME_PATTERN)]
"""A stage's name inside a pipeline (at most 32 characters, so it can never be mistaken for a 36-character job id);
the engine's rule (`sgtm_engine.config.stage_list`), so `sgtm run` and the API accept the same recipes."""
InputName = Annotated[str, StringConstraints(pattern=INPUT_NAME_PATTERN)]
PIPELINE_INPUT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,35}$"
"""A pipeline stage's input: an earlier stage's name or an existing job id."""
ExperimentName = Annotated[str, StringConstraints(pattern=EXPERIMENT_NAME_PATTERN)]
"""The engine's rule for a recipe's or a sweep's `experiment`, so `sgtm run` and the API accept the same names."""
IdempotencyKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
Queue = Literal["gpu", "cpu"]

CURSOR_PATTERN = r"^[A-Za-z0-9_=-]+$"
"""A page's `next_cursor` (URL-safe base64; api/paging.py)."""
CURSOR_RULE = "not a cursor this API issued; pass `next_cursor` from the previous page unchanged"

#: What a 422 says when a name does not match its pattern (pydantic would print the regular expression).
PATTERN_RULES = {
    UUID_PATTERN: "expected an id as the API returned it (a UUID: 8-4-4-4-12 lowercase hex digits)",
    CURSOR_PATTERN: CURSOR_RULE,
    STAGE_NAME_PATTERN: STAGE_NAME_RULE,
    INPUT_NAME_PATTERN: "an input name: 1-32 lowercase letters, digits or '_', starting with a letter",
    PIPELINE_INPUT_PATTERN: "an earlier stage's name or an existing job id",
    EXPERIMENT_NAME_PATTERN: EXPERIMENT_NAME_RULE,
}


def is_uuid(text: str) -> bool:
    """Whether `text` is a whole id as the API issues them (`fullmatch`: `$` alone also matches before a final
    newline)."""
    return _UUID.fullmatch(text) is not None


_SPEC_DOC = ("The stage spec as JSON: the fields of the engine's spec class for this kind (train → TrainSpec, "
             "ablate → AblateStageSpec, evaluate → EvaluateSpec, …). Omitted fields take their defaults; unknown "
             "fields are errors. Strings are registry names or enum values only.")


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """A JSON schema with its local `$ref`s replaced by the definitions they name (specs do not nest recursively)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):  # the definition, with the node's own keys on top
            target = _inline(defs[ref.removeprefix("#/$defs/")], defs)
            return {**target, **{k: _inline(v, defs) for k, v in node.items() if k != "$ref"}}
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _spec_schema() -> dict[str, Any]:
    """The OpenAPI schema of a stage spec: one of the engine's spec classes (the stage's `kind` says which), drawn
    from the dataclasses themselves, every field with its type, default and docstring. Validation stays the
    engine's (`api.specs`): this documents the body, it does not check it."""
    variants = []
    for kind, cls in STAGE_SPECS.items():
        schema = TypeAdapter(cls).json_schema()
        variant = _inline(schema, schema.get("$defs", {}))
        variant["title"] = f"{cls.__name__} (kind: {kind.value})"
        variants.append(variant)
    return {"type": "object", "anyOf": variants}


StageSpec = Annotated[dict[str, Any], WithJsonSchema(_spec_schema())]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    noun: ClassVar[str]
    """What a 422 calls this body (`unknown field of a recipe`), in the engine's words for the same document."""


class JobCreate(_Body):
    """Submit one stage."""

    noun: ClassVar[str] = "a job"

    kind: StageKind
    spec: StageSpec = Field(default_factory=dict, description=_SPEC_DOC)
    inputs: dict[InputName, JobId] = Field(
        default_factory=dict, description="Parent jobs whose outputs this stage reads, by input name: "
                                          "{'model': '<train job id>'}. Only job ids: never a path or URL.")
    queue: Queue | None = Field(None, description="Worker pool; default: 'cpu' when spec.runtime.device is 'cpu', "
                                                  "else the service's default queue.")
    gpus: int = Field(1, ge=1, le=8, description="GPUs on one machine; above 1 (train and attack only) the stage runs "
                                                  "under torchrun, each rank taking its share of every batch.")
    experiment: ExperimentName | None = Field(None, description="MLflow experiment; default: the service's.")


class StageCreate(_Body):
    """One stage of a pipeline. `inputs` name earlier stages of the same pipeline, or existing job ids."""

    noun: ClassVar[str] = "a stage"

    name: StageName
    kind: StageKind
    spec: StageSpec = Field(default_factory=dict, description=_SPEC_DOC)
    inputs: dict[InputName, Annotated[str, StringConstraints(pattern=PIPELINE_INPUT_PATTERN)]] = Field(
        default_factory=dict, description="{'model': 'train'}: an earlier stage's name, or an existing job id.")
    queue: Queue | None = None
    gpus: int = Field(1, ge=1, le=8)


class PipelineCreate(_Body):
    """Several stages in one request: a chain (train → ablate → evaluate) or a sweep (independent stages).
    A stage runs when all its parents have succeeded; if one fails, its descendants fail without running.
    A recipe file that `sgtm run` accepts is a valid body as it is (the same stage-list rules apply)."""

    noun: ClassVar[str] = "a recipe"

    name: StageName = "pipeline"
    description: str | None = Field(None, max_length=MAX_DESCRIPTION,
                                    description="Free text; not stored with the jobs.")
    experiment: ExperimentName | None = None
    stages: list[StageCreate] = Field(min_length=1, max_length=MAX_STAGES)


class SweepCreate(_Body):
    """A sweep (`sgtm_engine.sweep`): a base pipeline, named variants, a grid of dotted-path overrides and seeds.
    Cells = variants × grid × seeds; a cell that already succeeded (same cell id, any earlier sweep) is reused, one
    still running is attached, one that failed or was cancelled runs again. A stage that several cells share (same
    kind, resolved spec and inputs) runs once, and a cell run again keeps its stages that succeeded."""

    noun: ClassVar[str] = "a sweep"

    kind: Literal["sweep"] = "sweep"
    name: StageName = "sweep"
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    experiment: ExperimentName | None = None
    base: dict[str, Any] = Field(description="A pipeline recipe: {'stages': [{name, kind, spec, inputs}, ...]}.")
    variants: dict[str, Any] | None = Field(None, description="{variant: {'<stage>.<field path>': value}}; "
                                                              "'<stage>': null drops a stage.")
    grid: dict[str, Any] | None = Field(None, description="{'<stage>.<field path>': [values]}: cartesian product.")
    seeds: list[Any] | None = Field(None, description="Seeds; each sets every seed path of the cell.")
    seed_paths: list[Any] | None = Field(None, description="Dotted paths a seed sets; default: every stage's "
                                                           "`seed` plus train `noise.seed`.")


class Progress(BaseModel):
    step: int | None = None
    total: int | None = None
    fraction: float | None = None


class CheckpointRef(BaseModel):
    uri: str
    sha256: str | None = None


class MlflowRef(BaseModel):
    experiment_id: str | None = None
    run_id: str
    url: str | None = None


class JobError(BaseModel):
    type: str
    message: str | None = None
    exit_code: int | None = None


class JobRead(BaseModel):
    id: str
    kind: str
    status: JobStatus
    pipeline_id: str | None = None
    stage_name: str | None = None
    spec: dict[str, Any]
    spec_hash: str
    method: str
    seed: int | None = None
    experiment: str
    queue: str
    gpus: int
    inputs: dict[str, str] = Field(description="Input name → parent job id.")
    waiting_on: list[str] = Field(description="Parents that have not succeeded yet.")
    attempt: int = Field(description="Claims so far; each claim bumps it (the fencing token).")
    max_attempts: int
    lease_owner: str | None = None
    heartbeat_at: dt.datetime | None = None
    cancel_requested_at: dt.datetime | None = None
    progress: Progress | None = None
    last_metrics: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    checkpoint: CheckpointRef | None = None
    code_version: str | None = None
    mlflow: MlflowRef | None = None
    error: JobError | None = None
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    workdir: str | None = Field(None, description="The job's folder on the workers' machines (embedded mode: this "
                                                  "machine): result.json, checkpoints, logs/attempt-N.log.")
    links: dict[str, str]


class JobPage(BaseModel):
    items: list[JobRead]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next (older) page; null at the end.")


class PipelineRead(BaseModel):
    id: str
    name: str
    experiment: str
    status: JobStatus = Field(description="Derived from the jobs (shared stages included): running/queued while "
                                          "any is, then failed > cancelled > succeeded.")
    jobs: list[JobRead]
    shared_stages: dict[str, str] = Field(default_factory=dict, description=(
        "A sweep cell's stages that another pipeline's job computes (a stage several cells share runs once): stage "
        "name → job id."))
    mlflow: MlflowRef | None = None
    created_at: dt.datetime
    links: dict[str, str]


class SweepCellRead(BaseModel):
    cell_id: str = Field(description="spec_hash of the cell's resolved pipeline and seed: the dedupe key.")
    position: int
    variant: str | None = None
    params: dict[str, Any] = Field(description="The cell's grid values by dotted path.")
    seed: int | None = None
    status: JobStatus
    pipeline_id: str
    reused: bool = Field(description="The pipeline comes from an earlier submission (succeeded or still running).")
    jobs: dict[str, str] = Field(description="Stage name → job id, shared stages included: a stage that several "
                                             "cells share runs once, in the first such cell's pipeline.")
    error: JobError | None = None


class SweepRead(BaseModel):
    id: str
    name: str
    experiment: str
    status: JobStatus = Field(description="Derived from the cells, like a pipeline's from its jobs.")
    counts: dict[str, int] = Field(description="Cells by status.")
    spec: dict[str, Any] = Field(description="Variants, grid, seeds and seed paths as submitted.")
    cells: list[SweepCellRead]
    mlflow: MlflowRef | None = None
    cancelled_at: dt.datetime | None = Field(
        default=None, description="When the sweep was cancelled (cleared by a resume). Cells shared with a sweep "
                                  "that is not cancelled keep running for it.")
    created_at: dt.datetime
    links: dict[str, str]


class SweepSummary(BaseModel):
    id: str
    name: str
    experiment: str
    status: JobStatus
    counts: dict[str, int]
    created_at: dt.datetime
    links: dict[str, str]


class SweepPage(BaseModel):
    items: list[SweepSummary]
    next_cursor: str | None = None


class EventRead(BaseModel):
    """One server-sent event's data: a state change (`status`) or the engine's progress (`progress`, `eval`, …)."""

    id: int
    job_id: str
    attempt: int
    type: str
    step: int | None = None
    total: int | None = None
    data: dict[str, Any] | None = None
    created_at: dt.datetime


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
