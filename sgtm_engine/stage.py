"""`run_stage`: the one in-process entry to every stage, shared by `sgtm run`, the service's engine child and tests.

A stage runs in its own workdir and leaves there:
- `events.jsonl`: progress events, one JSON object a line (`started`, `phase`, `progress`, `eval`, `checkpoint`,
  `finished`; a `phase` names a long step without a step count: preparing data, each evaluation view);
- `result.json`: what it produced: metrics, summary, artifacts (model folders), checkpoint path + sha256, the
  resolved spec, seed, code version, data manifest hash and `backends` (device, dtype, attention backend, torch,
  CUDA, Python and library versions): the reproducibility record;
- on failure, `error.json` (type and message) for the supervisor.
Downstream stages receive their parents' workdirs as `inputs` and read the parents' `result.json`: the model to
start from (`artifacts.model`) and the data it was trained on (`data_spec`, re-prepared from the content cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgtm_engine.config import (
    STAGE_SPECS,
    AblateStageSpec,
    AttackSpec,
    DataSpec,
    EvaluateSpec,
    FilterSpec,
    NoiseSpec,
    RmuSpec,
    RuntimeSpec,
    StageKind,
    TrainSpec,
    from_dict,
    method_name,
    spec_hash,
    to_dict,
    unknown_choice,
)
from sgtm_engine.errors import ConfigError, SgtmError
from sgtm_engine.folders import LOCK_FILE, RESULT, EventLog, hold_folder, make_folder, write_json
from sgtm_engine.provenance import code_version
from sgtm_engine.runtime import ResourceMeter, Runtime, StopFlag, stage_runtime
from sgtm_engine.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from sgtm_engine.progress import Emit

log = logging.getLogger(__name__)



def read_result(workdir: Path) -> dict[str, Any]:
    """A stage's result record, its artifact paths made absolute (they are stored relative to the stage's folder,
    so a run folder can be moved or copied and read from any working directory)."""
    workdir = Path(workdir)
    path = workdir / RESULT
    if not path.exists():
        raise ConfigError(f"input {workdir}: no {RESULT}; did its stage finish?")
    record = json.loads(path.read_text())
    base = workdir.resolve()
    record["artifacts"] = {k: None if v is None else str((base / v).resolve())
                           for k, v in (record.get("artifacts") or {}).items()}
    if isinstance(record.get("checkpoint"), dict):
        record["checkpoint"]["path"] = str((base / record["checkpoint"]["path"]).resolve())
    return record


def _relative(path: str | Path | None, workdir: Path) -> str | None:
    return None if path is None else os.path.relpath(Path(path).resolve(), workdir.resolve())


STAGE_MARKER = "stage.json"


def claim_workdir(workdir: Path, kind: StageKind, spec: Any, overwrite: bool = False) -> None:
    """Make `workdir` this stage's folder: empty or new, or holding a run of the same kind and spec (which then
    resumes, `overwrite` or not). A folder holding anything else is refused with the differing fields named, or
    emptied with `overwrite`."""
    from sgtm_engine.checkpoint import describe_differences

    marker = workdir / STAGE_MARKER
    theirs = json.loads(marker.read_text()) if marker.exists() else None
    differences = _differences(theirs, kind, spec) if theirs is not None else []
    unknown = theirs is None and ((workdir / RESULT).exists() or (workdir / "checkpoints").exists())
    if overwrite and (differences or unknown):
        for child in workdir.iterdir():
            if child.name == LOCK_FILE:  # held by this process: removing it would let another one lock a new file
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif differences:
        assert theirs is not None
        raise ConfigError(f"workdir {workdir} holds a {theirs.get('kind')} run of another spec "
                          f"({describe_differences(differences)}); use a fresh workdir, or overwrite to start over "
                          "(--overwrite)")
    elif unknown:
        raise ConfigError(f"workdir {workdir} holds a run but no {STAGE_MARKER}, so its spec is unknown; use a fresh "
                          "workdir, or overwrite to start over (--overwrite)")
    write_json(marker, {"kind": kind.value, "spec": to_dict(spec)})


def finished_result(workdir: Path, kind: StageKind, spec: Any) -> dict[str, Any] | None:
    """The result of this very stage if it has already finished in `workdir`, else None: same kind and spec as
    `claim_workdir` compares them, and the same `register` (a new one must run the stage's publishing again)."""
    marker = Path(workdir) / STAGE_MARKER
    if not marker.exists() or not (Path(workdir) / RESULT).exists():
        return None
    theirs = json.loads(marker.read_text())
    if _differences(theirs, kind, spec) or theirs["spec"].get("register") != to_dict(spec).get("register"):
        return None
    return read_result(workdir)


def _differences(theirs: dict[str, Any], kind: StageKind, spec: Any) -> list[tuple[str, Any, Any]]:
    """What makes the run recorded in a stage marker another run than (kind, spec) would be."""
    from sgtm_engine.checkpoint import spec_differences

    differences = [("kind", theirs.get("kind"), kind.value)] if theirs.get("kind") != kind.value else []
    return differences + spec_differences(theirs.get("spec"), to_dict(spec))


# ---------------------------------------------------------------------------------------------------------------------
# Stages


def _prepare(data_spec: DataSpec, context: int, cache_dir: Path, noise: NoiseSpec, filter: FilterSpec, emit):
    from sgtm_engine.data.prepare import prepare_data

    emit({"type": "phase", "phase": "preparing data"})
    return prepare_data(data_spec, context, cache_dir, noise, filter)


def run_train(spec: TrainSpec, workdir: Path, inputs: dict[str, Path], runtime: Runtime, cache_dir: Path,
              tracker: Tracker, emit, stop: StopFlag) -> dict[str, Any]:
    from sgtm_engine.train import train

    data = _prepare(spec.data, spec.model.context, cache_dir, spec.noise, spec.filter, emit)
    if runtime.is_main:
        data.tokenizer.save_pretrained(workdir / "tokenizer")
    result = train(spec, workdir, data, runtime, tracker, emit, stop)
    st = result.state
    resolved = dataclasses.replace(spec, model=dataclasses.replace(spec.model, vocab_size=data.vocab_size))
    return {
        "metrics": result.final_metrics,
        "summary": {"steps": st.step, "skipped_steps": st.skipped, "tokens": st.tokens,
                    "flops": 6.0 * result.model.num_parameters() * st.tokens, "params": result.model.num_parameters(),
                    "mode_steps": st.mode_steps, "wall_seconds": round(st.wall_seconds, 2),
                    "tokens_per_s": round(st.tokens / max(st.wall_seconds, 1e-9), 1),
                    "plan": result.plan_counts, "partition": result.model.partition.describe()},
        "history": st.history,
        "artifacts": {"model": str(result.checkpoint), "tokenizer": str(workdir / "tokenizer")},
        "resolved_spec": to_dict(resolved),
        "data_spec": to_dict(spec.data), "noise_spec": to_dict(spec.noise), "filter_spec": to_dict(spec.filter),
        "context": spec.model.context,
        "manifest_hash": data.manifest_hash, "data": data.summary(), "seed": spec.seed,
        "method": method_name(spec),
    }


def _lineage(inputs: dict[str, Path]) -> dict[str, Any]:
    if "model" not in inputs:
        raise ConfigError("inputs: this stage needs a parent model (--input model=<parent workdir>)")
    return read_result(inputs["model"])


def run_ablate(spec: AblateStageSpec, workdir: Path, inputs: dict[str, Path], runtime: Runtime, cache_dir: Path,
               tracker: Tracker, emit, stop: StopFlag) -> dict[str, Any]:
    from sgtm_engine.model.ablation import ablate
    from sgtm_engine.model.hf import load_hf, save_hf

    parent = _lineage(inputs)
    model = load_hf(parent["artifacts"]["model"])
    used = ablate(model, spec.ablate)
    out = save_hf(model, workdir / "model")
    emit({"type": "progress", "step": 1, "total": 1, "metrics": {}})
    return {**_inherit(parent), "metrics": {}, "summary": {"ablated_tensors": len(used), "kind": spec.ablate.kind},
            "artifacts": {"model": str(out), "tokenizer": parent["artifacts"].get("tokenizer")},
            "resolved_spec": to_dict(spec), "ablated": True}


def run_evaluate(spec: EvaluateSpec, workdir: Path, inputs: dict[str, Path], runtime: Runtime, cache_dir: Path,
                 tracker: Tracker, emit, stop: StopFlag) -> dict[str, Any]:
    from sgtm_engine.evaluate import evaluate_views, flat_metrics
    from sgtm_engine.model.hf import load_hf

    parent = _lineage(inputs)
    model = load_hf(parent["artifacts"]["model"], device=runtime.device)
    data = _prepare(from_dict(DataSpec, parent["data_spec"]), parent["context"], cache_dir,
                    from_dict(NoiseSpec, parent["noise_spec"]), from_dict(FilterSpec, parent["filter_spec"]), emit)
    phases = {"count": 1}

    def phase(event: dict[str, Any]) -> None:  # the phases are this stage's steps: its progress counts them
        phases["count"] = event["count"]
        emit({**event, "step": event["index"], "total": event["count"]})

    views = evaluate_views(model, data, spec.eval, spec.ablate, spec.calibrate, runtime, emit=phase,
                           save_calibrated=workdir / "calibrated_model")
    metrics = flat_metrics(views)
    if runtime.is_main:
        tracker.log_metrics(metrics, 0)
    emit({"type": "eval", "step": phases["count"], "total": phases["count"], "metrics": metrics})
    artifacts = dict(parent["artifacts"])
    if "eval_calibrated" in views:  # the ablated model with its calibrated output bias: the one to deploy
        artifacts["calibrated_model"] = str(workdir / "calibrated_model")
    return {**_inherit(parent), "metrics": metrics, "summary": {"views": sorted(views)},
            "artifacts": artifacts, "resolved_spec": to_dict(spec)}


def _inherit(parent: dict[str, Any]) -> dict[str, Any]:
    """What a downstream stage needs to know about the data lineage."""
    keys = ("data_spec", "noise_spec", "filter_spec", "context", "manifest_hash", "seed", "method")
    return {k: parent[k] for k in keys if k in parent}


def run_attack(spec: AttackSpec, workdir: Path, inputs: dict[str, Path], runtime: Runtime, cache_dir: Path,
               tracker: Tracker, emit, stop: StopFlag) -> dict[str, Any]:
    """Fine-tuning attack on input `model`; the reference comes from the spec or input `baseline` (attack.py)."""
    from sgtm_engine.attack import run_attack_stage

    parent = _lineage(inputs)
    baseline = read_result(inputs["baseline"]) if "baseline" in inputs else None
    record = run_attack_stage(spec, parent, baseline, workdir, runtime, cache_dir, tracker, emit, stop)
    return {**_inherit(parent), **record}


def run_rmu(spec: RmuSpec, workdir: Path, inputs: dict[str, Path], runtime: Runtime, cache_dir: Path,
            tracker: Tracker, emit, stop: StopFlag) -> dict[str, Any]:
    """RMU unlearning of input `model` (rmu.py)."""
    from sgtm_engine.rmu import run_rmu_stage

    parent = _lineage(inputs)
    return {**_inherit(parent), **run_rmu_stage(spec, parent, workdir, runtime, cache_dir, tracker, emit, stop)}


STAGE_RUNNERS = {StageKind.TRAIN: run_train, StageKind.ABLATE: run_ablate, StageKind.EVALUATE: run_evaluate,
                 StageKind.ATTACK: run_attack, StageKind.RMU: run_rmu}


# ---------------------------------------------------------------------------------------------------------------------
# The entry


def run_stage(kind: StageKind | str, spec: Any, workdir: str | Path, inputs: dict[str, Path] | None = None,
              tracker: Tracker | None = None, emit: Emit | None = None,
              stop: StopFlag | None = None, cache_dir: str | Path | None = None, overwrite: bool = False
              ) -> dict[str, Any]:
    """Run one stage in `workdir` and return (and write) its result record.

    Args:
        kind: train, ablate, evaluate, attack or rmu.
        spec: the stage's spec object, or plain data validated into it.
        workdir: the stage's folder (created); re-running in the same folder resumes from its checkpoint.
        inputs: parent stage workdirs by role (`model`; an attack also reads `baseline`).
        tracker: metrics destination (default NullTracker).
        emit: extra progress callback (events always go to events.jsonl too).
        stop: stop flag (SIGTERM handler installed by the CLI).
        cache_dir: content-addressed data/tokenizer cache (default: <workdir>/../.cache).
        overwrite: start over in a workdir that holds a run of another spec (else that is refused).
    """
    try:
        kind = StageKind(kind)
    except ValueError:
        raise ConfigError(unknown_choice(("kind",), kind, [k.value for k in StageKind])) from None
    if kind not in STAGE_RUNNERS:
        raise ConfigError(f"kind={kind.value!r}: no runner for this stage kind yet; known: "
                          f"{sorted(k.value for k in STAGE_RUNNERS)}")
    spec_cls = STAGE_SPECS[kind]
    if not isinstance(spec, spec_cls):
        spec = from_dict(spec_cls, spec)
    workdir = make_folder(Path(workdir))
    with contextlib.ExitStack() as held:  # rank 0 holds the folder until its result is written
        cache = Path(cache_dir) if cache_dir else workdir.parent / ".cache"
        tracker = tracker or NullTracker()
        events = EventLog(workdir, emit)
        runtime_spec = getattr(spec, "runtime", None)
        with stage_runtime(runtime_spec if runtime_spec is not None else RuntimeSpec()) as runtime:
            if runtime.is_main:
                held.enter_context(hold_folder(workdir, f"a {kind.value} stage"))
                claim_workdir(workdir, kind, spec, overwrite)
            runtime.barrier()  # other ranks read the folder only once rank 0 has claimed (or cleared) it
            started = time.time()
            version = code_version()  # as the stage starts, when it imports its modules (the checkout may change)
            events({"type": "started", "kind": kind.value, "spec_hash": spec_hash(spec)})
            meter = ResourceMeter(runtime.device)
            record = STAGE_RUNNERS[kind](spec, workdir, dict(inputs or {}), runtime, cache, tracker, events,
                                         stop or StopFlag())
        # torchrun's ranks have left their process group together; rank 0 writes the stage's outputs
        resources = meter.read()
        record["artifacts"] = {k: _relative(v, workdir) for k, v in (record.get("artifacts") or {}).items()}
        checkpoint = record["artifacts"].get("model")
        backends = runtime.describe()
        record = {
            "kind": kind.value, "spec_hash": spec_hash(spec), "code_version": version, "backends": backends,
            "resources": resources, "started_at": started, "finished_at": time.time(), **record,
        }
        if checkpoint and kind == StageKind.TRAIN:
            from sgtm_engine.checkpoint import checkpoint_digest

            record["checkpoint"] = {"path": checkpoint, "sha256": checkpoint_digest(workdir / checkpoint)}
        if runtime.is_main:
            write_json(workdir / RESULT, record)
            write_json(workdir / "resolved_spec.json", {
                "kind": kind.value, "spec": record.get("resolved_spec"), "seed": record.get("seed"),
                "code_version": record["code_version"], "manifest_hash": record.get("manifest_hash")})
            tracker.set_tags({f"sgtm.{key}": str(value) for key, value in backends.items()})
            tracker.log_metrics({f"resources/{k}": v for k, v in resources.items() if not isinstance(v, str)}, 0)
            tracker.flush()
            try:
                tracker.log_artifact(workdir / "resolved_spec.json")
                tracker.log_artifact(workdir / RESULT)
            except Exception as exc:  # noqa: BLE001 - an artifact store hiccup must not fail a finished stage
                log.warning("could not log artifacts: %s", exc)
            log_stage_model(tracker, kind, workdir, getattr(spec, "register", None))
        events({"type": "finished", "kind": kind.value})
        return read_result(workdir) if runtime.is_main else record


def log_stage_model(tracker: Tracker, kind: StageKind, workdir: Path, register: str | None) -> str | None:
    """Log the model a finished stage produced as an MLflow model (registered as `register` when given): a train,
    ablate, attack or RMU stage's `model`, an evaluate stage's `calibrated_model` (its `model` is its parent's)."""
    calibrated = kind == StageKind.EVALUATE
    key = "calibrated_model" if calibrated else "model"
    if read_result(workdir)["artifacts"].get(key) is None:
        return None

    def write_export(out: Path) -> Path:
        from sgtm_engine.export import export_model

        return export_model(workdir, out, calibrated=calibrated)

    return tracker.log_model(key, write_export, register)


def error_record(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc),
            "problems": getattr(exc, "problems", None) if isinstance(exc, SgtmError) else None}
