"""`sgtm sweep FILE --local`: run a sweep's cells locally, resumably, and write its report.

The cells are `sweep.parse_sweep`'s (the same expansion, cell ids and dedupe as the service's sweeps) and the report
`report.build_report`'s. The run folder (stages shared between cells, cell records, report) and how stages are
scheduled, resumed and tracked are user documentation: docs/sweeps.md, "Running locally".
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgtm_engine.config import STAGE_SPECS, StageKind, from_dict
from sgtm_engine.errors import ConfigError
from sgtm_engine.folders import (
    EVENTS,
    RESULT,
    EventTail,
    hold_folder,
    local_artifact_root,
    local_tracking_uri,
    make_folder,
    write_json,
)
from sgtm_engine.mlflow_keys import run_tags
from sgtm_engine.recipe import read_sweep
from sgtm_engine.report import SUCCEEDED, build_report, report_files
from sgtm_engine.sweep import Cell, SweepPlan, apply_sweep_overrides, cell_label, parse_sweep, stage_keys
from sgtm_engine.yamlio import dump_yaml

if TYPE_CHECKING:
    from sgtm_engine.progress import Emit

# ---------------------------------------------------------------------------------------------------------------------
# The sweep document


def load_sweep(name_or_path: str, overrides: dict[str, Any] | None = None,
               defaults: Callable[[dict[str, Any]], dict[str, Any]] = lambda data: {}) -> SweepPlan:
    """Read a sweep file and apply `defaults(data)`, then `overrides` (`--set`), before expanding it."""
    data = read_sweep(name_or_path)
    return parse_sweep(apply_sweep_overrides(data, {**defaults(data), **(overrides or {})}))


def cells_yaml(sweep: SweepPlan) -> str:
    """Every cell's resolved pipeline, as YAML (`--print-config`)."""
    cells = [{"cell": cell_label(c), "cell_id": c.cell_id, "stages": [
        {k: s[k] for k in ("name", "kind", "inputs", "spec")} for s in c.stages]} for c in sweep.cells]
    return dump_yaml({"sweep": sweep.name, "cells": cells})


# ---------------------------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class _Task:
    """One distinct stage, known by its folder's name: what `runner.run_tracked_stage` needs. It waits for the
    stages whose folders are its inputs."""

    kind: str
    spec: dict[str, Any]
    folder: Path
    inputs: dict[str, Path]
    name: str
    cell_run_id: str | None
    tags: dict[str, str]
    recipe: str
    """The sweep's name: the stage run's `sgtm.recipe`."""


def stage_folders(cell: Cell, workdir: Path) -> dict[str, Path]:
    """Stage name -> its folder `stages/<kind>-<key>` (`stage_keys`); equal stages of different cells get the same
    folder."""
    keys = stage_keys(cell.stages)
    return {s["name"]: workdir / "stages" / f"{s['kind']}-{keys[s['name']]}" for s in cell.stages}


def run_sweep(sweep: SweepPlan, workdir: Path, *, jobs: int = 1, mlflow_uri: str | None = None,
              cache_dir: Path | None = None, echo: Callable[[str], None] = print,
              events: Callable[[str], Emit] | None = None) -> dict[str, Any]:
    """Run every cell that has not succeeded in `workdir` yet, then write and return the sweep's report.
    `mlflow_uri` None: no tracking. `events(stage label)`: where each stage also sends its progress events
    (progress bars, which then tell when it is done), from a worker process too."""
    from sgtm_engine.provenance import code_version
    from sgtm_engine.runner import open_run, parent_run

    if jobs < 1:
        raise ConfigError(f"jobs={jobs}: stages run at once; at least 1")
    workdir = make_folder(Path(workdir))
    with hold_folder(workdir, f"sgtm sweep {sweep.name}"):  # one process per sweep folder
        (workdir / "cells").mkdir(exist_ok=True)
        # a stage folder removed by hand (to run that stage again) makes its cell one to run, whatever it was
        todo = [c for c in sweep.cells if _cell_status(workdir, c) != SUCCEEDED or not _stages_done(workdir, c)]
        echo(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(sweep.cells) - len(todo)} already succeeded in "
             f"{workdir}")
        experiment = sweep.experiment or sweep.name
        # the workdir's own store keeps its artifacts beside it; another store decides for itself
        artifact_root = local_artifact_root(workdir) if mlflow_uri == local_tracking_uri(workdir) else None
        parent = parent_run(workdir, mlflow_uri, experiment, sweep.name, artifact_root=artifact_root,
                            tags={**run_tags(kind="sweep", code_version=code_version()), "sgtm.sweep": sweep.name})
        tasks: dict[str, _Task] = {}
        cell_runs = {}
        for cell in todo:
            tags = {"sgtm.cell_id": cell.cell_id, "sgtm.variant": cell.variant or "",
                    **run_tags(kind="cell", seed=cell.seed)}
            tags.update({f"sgtm.param.{k}": str(v) for k, v in cell.params.items()})
            cell_runs[cell.cell_id] = run = open_run(mlflow_uri, experiment, cell_label(cell), tags=tags,
                                                     parent_run_id=parent.run_id, artifact_root=artifact_root)
            folders = stage_folders(cell, workdir)
            for stage in cell.stages:
                folder = folders[stage["name"]]
                if folder.name not in tasks and not (folder / RESULT).exists():
                    tasks[folder.name] = _Task(stage["kind"], stage["spec"], folder,
                                               {r: folders[p] for r, p in stage["inputs"].items()},
                                               f"{stage['name']} {cell_label(cell)}", run.run_id, tags, sweep.name)
        try:
            errors = _run_tasks(tasks, jobs, mlflow_uri, experiment, cache_dir, echo, events)
        except BaseException:  # interrupted: no run stays RUNNING; a rerun continues from the finished stages
            for run in [*cell_runs.values(), parent]:
                run.close("KILLED")
            raise
        for cell in todo:
            folders = stage_folders(cell, workdir)
            failed = [errors[f.name] for f in folders.values() if f.name in errors]
            status = SUCCEEDED if _stages_done(workdir, cell) else "failed"
            write_json(workdir / "cells" / f"{cell.cell_id}.json", {
                "cell_id": cell.cell_id, "variant": cell.variant, "params": cell.params, "seed": cell.seed,
                "status": status, "stages": {n: str(f.relative_to(workdir)) for n, f in folders.items()},
                "error": failed[0] if failed else None})
            cell_runs[cell.cell_id].close("FINISHED" if status == SUCCEEDED else "FAILED")
        report = build_report([_record(workdir, c) for c in sweep.cells], workdir)
        parent.log_metrics(report["metrics"], step=0)
        for path in report_files(report, workdir):
            parent.log_artifact(path)
        parent.close("FINISHED" if report["n_succeeded"] == report["n_cells"] else "FAILED")
        return report


def _run_tasks(tasks: dict[str, _Task], jobs: int, uri: str | None, experiment: str, cache_dir: Path | None,
               echo: Callable[[str], None], events: Callable[[str], Emit] | None
               ) -> dict[str, str]:
    """Run the tasks, each once its inputs are done, at most `jobs` at a time; returns {folder name: error} of the
    failed ones (a task whose input failed fails without running). `events` gets a worker process's stage events
    from the stage's `events.jsonl`, as the service's supervisor does.

    A worker process that dies (the kernel's out-of-memory killer, a crash in native code) breaks the pool, and the
    stages running beside it end with it: the pool starts again and those stages run again, one at a time, so a
    stage that kills its worker again, alone, fails alone and the others go on."""
    pool = _worker_pool(jobs) if jobs > 1 else None
    pending, done, errors = list(tasks.values()), set(), {}
    running: dict[Future, tuple[_Task, float, EventTail | None]] = {}
    suspects: set[str] = set()  # running when a worker died: each runs alone until it has ended once
    died: list[_Task] = []  # the stages of a broken pool, back so far
    try:
        while pending or running:
            capacity = 0 if died else (1 if suspects else jobs)  # a broken pool takes nothing until it restarts
            for task in sorted(pending, key=lambda t: t.folder.name not in suspects):
                after = [p.name for p in task.inputs.values()]
                blocked = [k for k in after if k in errors]
                if blocked:
                    errors[task.folder.name] = f"input {blocked[0]} failed"
                    pending.remove(task)
                elif all(k in done or k not in tasks for k in after) and len(running) < capacity:
                    tail = EventTail(task.folder / EVENTS) if pool and events else None
                    emit = events(task.name) if events and pool is None else None
                    running[_submit(pool, task, uri, experiment, cache_dir, emit)] = (task, time.perf_counter(), tail)
                    pending.remove(task)
            finished, _ = wait(running, timeout=0.2 if pool and events else None, return_when=FIRST_COMPLETED)
            for task, _, tail in running.values():  # a finished stage's last events, before its end is told
                if tail is not None and events is not None:
                    for event in tail.read():
                        events(task.name)(event)
            for future in finished:
                task, started, _ = running.pop(future)
                exc = future.exception()
                if isinstance(exc, BrokenProcessPool):
                    died.append(task)
                    continue
                suspects.discard(task.folder.name)
                if exc is None:
                    done.add(task.folder.name)
                    if events is None:  # else its bar said so
                        echo(f"{task.name}: done in {time.perf_counter() - started:.1f} s")
                else:
                    _failed(task, exc, errors, echo, events)
            if died and not running:  # every stage of the broken pool is back: start it again
                for task in died:
                    if task.folder.name in suspects:  # it died again, running alone: it is what kills its worker
                        suspects.discard(task.folder.name)
                        _failed(task, WorkerDied("its worker process died while running it, twice (killed by a "
                                                 "signal: the kernel's out-of-memory killer, or a crash in native "
                                                 "code)"), errors, echo, events)
                    else:
                        suspects.add(task.folder.name)
                        pending.insert(0, task)
                died = []
                assert pool is not None  # only a worker pool breaks
                pool.shutdown(wait=True, cancel_futures=True)
                pool = _worker_pool(jobs)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return errors


class WorkerDied(Exception):
    """A stage's worker process ended without returning: killed by a signal, or crashed."""


def _failed(task: _Task, exc: BaseException, errors: dict[str, str], echo: Callable[[str], None],
            events: Callable[[str], Emit] | None) -> None:
    errors[task.folder.name] = "".join(traceback.format_exception(exc))  # kept in the cell's file
    if events is None:
        echo(f"{task.name}: FAILED ({type(exc).__name__}: {exc})")
    else:  # its bar stops and says so
        events(task.name)({"type": "failed", "error": f"{type(exc).__name__}: {exc}"})


def _submit(pool: ProcessPoolExecutor | None, *args: Any) -> Future:
    """The task in a worker process, or run here at once (its future done when this returns)."""
    if pool is not None:
        return pool.submit(_run_task, *args)
    future: Future = Future()
    try:
        future.set_result(_run_task(*args))
    except Exception as exc:  # noqa: BLE001 - a failed stage fails its cells, not the sweep
        future.set_exception(exc)
    return future


def gpu_slots(jobs: int, gpus: list[str]) -> list[str]:
    """The GPU each of `jobs` workers gets: one each while they last, then round again (workers then share)."""
    return [gpus[i % len(gpus)] for i in range(jobs)] if gpus else []


def _worker_pool(jobs: int, gpus: list[str] | None = None) -> ProcessPoolExecutor:
    """`jobs` spawned workers; each takes its GPU of `gpus` (default: `gpu_slots` of the visible GPUs) as it
    starts, so parallel stages do not all land on the first GPU (a stage's device `auto` is the worker's GPU)."""
    from sgtm_engine.runtime import visible_gpus

    context = multiprocessing.get_context("spawn")
    gpus = gpu_slots(jobs, visible_gpus()) if gpus is None else gpus
    slots = None
    if gpus:
        slots = context.SimpleQueue()
        for gpu in gpus:
            slots.put(gpu)
    return ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(jobs, slots))


def _start_worker(jobs: int, slots: Any = None) -> None:
    if slots is not None:  # before anything here touches CUDA, which reads it once
        os.environ["CUDA_VISIBLE_DEVICES"] = slots.get()
    import torch

    # the workers share the cores (a stage's runtime.threads, when set, still decides for it): `jobs` processes of
    # torch's default, one thread per core each, would oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def _run_task(task: _Task, uri: str | None, experiment: str, cache_dir: Path | None,
              emit: Emit | None = None) -> None:
    from sgtm_engine.runner import run_tracked_stage

    kind = StageKind(task.kind)
    run_tracked_stage(kind, from_dict(STAGE_SPECS[kind], task.spec), task.folder, task.inputs, uri=uri,
                      experiment=experiment, name=task.name, parent_run_id=task.cell_run_id, tags=task.tags,
                      recipe=task.recipe, cache_dir=cache_dir, emit=emit)


# ---------------------------------------------------------------------------------------------------------------------
# The workdir's records


def _cell_status(workdir: Path, cell: Cell) -> str:
    path = workdir / "cells" / f"{cell.cell_id}.json"
    return json.loads(path.read_text())["status"] if path.exists() else "pending"


def _stages_done(workdir: Path, cell: Cell) -> bool:
    return all((folder / RESULT).exists() for folder in stage_folders(cell, workdir).values())


def _record(workdir: Path, cell: Cell) -> dict[str, Any]:
    """The report's record of a cell: its stages' results from their folders."""
    stages = {}
    for name, folder in stage_folders(cell, workdir).items():
        if (folder / RESULT).exists():
            stages[name] = json.loads((folder / RESULT).read_text())
    return {"cell_id": cell.cell_id, "variant": cell.variant, "params": cell.params, "seed": cell.seed,
            "status": _cell_status(workdir, cell), "stages": stages}

