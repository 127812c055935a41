"""The local sweep executor and the sweep files it runs for `sgtm demo` and `sgtm attack-matrix`: expansion into the
expected cells, stages shared between cells, resuming (succeeded cells skipped by id, failed ones rerun), the same
results with one or two worker processes, MLflow runs nested as the service nests them, and the report's tables."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgtm_engine.errors import ConfigError
from sgtm_engine.local_sweep import load_sweep, run_sweep, stage_folders
from sgtm_engine.recipe import read_sweep
from sgtm_engine.report import report_markdown
from sgtm_engine.sweep import apply_sweep_overrides, cell_label, parse_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

#: The attack matrix at test size: every trained model shrunk the same way, so `reference` and a clean `train` stay
#: one stage.
TINY = {f"{stage}.{k}": v for stage in ("reference", "train") for k, v in {
    "model": {"n_layer": 2, "d_model": 64, "n_head": 8, "context": 32},
    "data.vocab_size": 512, "data.max_docs_per_split": 40, "data.test_docs_per_category": 2,
    "optim.warmup_steps": 1, "steps": 4, "batch_size": 4, "log_every": 2}.items()}
TINY.update({"attack.steps": 4, "attack.eval_every": 2, "attack.batch_size": 4, "attack.optim.warmup_steps": 1,
             "seeds": [0], "variants": ["no_filter", "weak_filter", "sgtm_zero"]})


def _folders(cell, root=Path("w")):
    return {name: path.name for name, path in stage_folders(cell, root).items()}


# ---------------------------------------------------------------------------------------------------------------------
# The sweep files


def test_demo_sweep_is_four_methods_and_two_attacks_against_the_no_filter_model():
    sweep = load_sweep("demo")
    cells = {c.variant: c for c in sweep.cells}
    assert list(cells) == ["no_filter", "recall_filter", "gradient_routing", "sgtm"] and sweep.seeds == []
    assert [s["name"] for s in cells["no_filter"].stages] == ["train", "evaluate"]
    assert [s["name"] for s in cells["sgtm"].stages] == ["reference", "train", "evaluate", "attack"]
    no_filter = _folders(cells["no_filter"])["train"]
    assert _folders(cells["sgtm"])["reference"] == _folders(cells["recall_filter"])["reference"] == no_filter
    train = {v: c.stages[-1 if v in ("no_filter", "gradient_routing") else 1] for v, c in cells.items()}
    assert train["recall_filter"]["spec"]["filter"]["kind"] == "weak"
    assert train["sgtm"]["spec"]["noise"]["recall"] == 0.98 and train["sgtm"]["spec"]["steps"] == 300


def test_demo_quick_overrides_keep_the_reference_shared():
    from sgtm_engine.cli import DEMO_QUICK
    from sgtm_engine.yamlio import parse_sets

    sweep = load_sweep("demo", parse_sets(list(DEMO_QUICK)))
    cells = {c.variant: c for c in sweep.cells}
    assert sweep.name == "demo-quick" and cells["sgtm"].stages[1]["spec"]["steps"] == 20
    assert _folders(cells["sgtm"])["reference"] == _folders(cells["no_filter"])["train"]


def test_attack_matrix_sweep_attacks_every_row_against_its_seeds_no_filter_model():
    sweep = load_sweep("attack-matrix")
    assert len(sweep.cells) == 10 * 3 and sweep.seeds == [0, 1, 2]
    cell = {(c.variant, c.seed): c for c in sweep.cells}
    for (_, seed), c in cell.items():
        attack = c.stages[-1]
        assert attack["inputs"]["baseline"] == "reference" and attack["spec"]["seed"] == seed
        assert _folders(c)["reference"] == _folders(cell["no_filter", seed])["train"]
    assert [s["name"] for s in cell["rmu", 1].stages] == ["reference", "rmu", "attack"]
    assert cell["rmu", 1].stages[-1]["inputs"]["model"] == "rmu"
    assert _folders(cell["sgtm_zero", 2])["train"] == _folders(cell["sgtm_reinit", 2])["train"]  # trained once
    assert cell["sgtm_reinit", 2].stages[-1]["spec"]["ablate"] == {"kind": "reinit", "seed": 2}
    assert cell["recall_filter", 0].stages[1]["spec"]["noise"]["recall"] == 0.9
    attacks = {json.dumps({k: v for k, v in c.stages[-1]["spec"].items() if k not in ("seed", "ablate")},
                          sort_keys=True) for c in sweep.cells}
    assert len(attacks) == 1  # the same attack for every row


@pytest.fixture
def ran(monkeypatch):
    """The (sweep, workdir) pairs the CLI hands to the executor (which is replaced by a recorder here)."""
    import sgtm_engine.local_sweep

    seen = []

    def record(sweep, workdir, **_):
        seen.append((sweep, workdir))
        return {"n_cells": 0, "n_succeeded": 0, "n_failed": 0, "statuses": {}, "tables": [], "figures": {}}

    monkeypatch.setattr(sgtm_engine.local_sweep, "run_sweep", record)
    return seen


def test_the_aliases_run_their_sweep_files(ran, tmp_path):
    from sgtm_engine.cli import app

    runner = CliRunner()
    for args in (["attack-matrix"], ["attack-matrix", "--corpus", "wiki-bio", "--set", "seeds=[1]"],
                 ["demo", "--quick"]):
        result = runner.invoke(app, [*args, "--no-track", "--workdir", str(tmp_path)])
        assert result.exit_code == 0, result.output
    (bilingual, _), (bio, _), (quick, _) = ran
    assert "strict_filter" not in {c.variant for c in bilingual.cells} and len(bilingual.cells) == 9 * 3
    assert len(bio.cells) == 10 and {c.seed for c in bio.cells} == {1}
    assert {s["spec"]["data"]["corpus"] for c in bio.cells for s in c.stages if s["kind"] == "train"} == {"wiki-bio"}
    assert quick.name == "demo-quick" and len(quick.cells) == 4


def test_each_alias_writes_to_its_own_sweeps_folder(ran, tmp_path, monkeypatch):
    """The demo's smoke version does not overwrite the demo's report: each sweep has its folder, as with sgtm sweep."""
    from sgtm_engine.cli import app

    monkeypatch.chdir(tmp_path)
    for args in (["demo"], ["demo", "--quick"], ["attack-matrix"], ["sweep", "demo", "--local"]):
        result = CliRunner().invoke(app, [*args, "--no-track"])
        assert result.exit_code == 0, result.output
    assert [str(workdir) for _, workdir in ran] == ["runs/demo", "runs/demo-quick", "runs/attack-matrix", "runs/demo"]


def test_sweep_overrides_pick_variants_in_file_order_and_set_base_fields():
    data = read_sweep("attack-matrix")
    kept = apply_sweep_overrides(data, {"variants": ["sgtm_zero", "no_filter"], "train.steps": 7})
    assert list(kept["variants"]) == ["no_filter", "sgtm_zero"]
    assert kept["base"]["stages"][1]["spec"]["steps"] == 7 and kept["base"]["stages"][0]["spec"]["steps"] == 600
    with pytest.raises(ConfigError, match="unknown.*'sgtm'"):
        apply_sweep_overrides(data, {"variants": ["sgtm"]})


def test_sweep_print_config_prints_resolved_cells_and_runs_nothing(tmp_path):
    from sgtm_engine.cli import app

    result = CliRunner().invoke(app, ["sweep", "demo", "--local", "--print-config", "--workdir", str(tmp_path),
                                      "--set", "variants=[sgtm]"])
    assert result.exit_code == 0, result.output
    assert "cell: (variant=sgtm)" in result.output and "n_head: 32" in result.output  # defaults filled in
    assert not list(tmp_path.iterdir())


def test_sweep_without_local_hands_over_to_the_service_command():
    from sgtm_engine import cli

    cli._load_plugins()
    assert "sweep" in cli._SHADOWED  # the service's own `sweep`, reached when --local is absent
    assert [c.name for c in cli.app.registered_commands].count("sweep") == 1


# ---------------------------------------------------------------------------------------------------------------------
# Running


@pytest.fixture(scope="module")
def tiny_matrix():
    return parse_sweep(apply_sweep_overrides(read_sweep("attack-matrix"), TINY))


@pytest.fixture(scope="module")
def first_run(tiny_matrix, tmp_path_factory, engine_cache):
    """The tiny matrix run once (~15 s on 2 cores): every test that uses it is marked slow."""
    workdir = tmp_path_factory.mktemp("matrix")
    from sgtm_engine.folders import local_tracking_uri

    lines: list[str] = []
    report = run_sweep(tiny_matrix, workdir, mlflow_uri=local_tracking_uri(workdir), cache_dir=engine_cache,
                       echo=lines.append)
    return workdir, report, lines


@pytest.mark.slow
def test_a_sweep_runs_each_distinct_stage_once_and_reports(first_run):
    workdir, report, lines = first_run
    assert report["n_cells"] == report["n_succeeded"] == 3
    # 3 trains (no filter, which is also every cell's reference; weak filter; sgtm) and 3 attacks
    assert sorted(p.name.split("-")[0] for p in (workdir / "stages").iterdir()) == ["attack"] * 3 + ["train"] * 3
    assert sum("done in" in line for line in lines) == 6
    attack = next(t for t in report["tables"] if t["name"] == "attack")
    no_filter = attack["rows"][0]
    assert no_filter["variant"] == "no_filter" and no_filter["stats"]["attack/steps_to_recovery"]["mean"] == 0
    md = (workdir / "report.md").read_text()
    assert "| forget loss at step 0 | retain loss at step 0 | recovered |" in md and "| sgtm_zero | 1/1 |" in md
    assert set(report["figures"]) >= {"attack"} and (workdir / "attack.png").stat().st_size > 0


@pytest.mark.slow
def test_mlflow_runs_nest_cells_under_the_sweep_and_stages_under_cells(first_run):
    from mlflow.tracking import MlflowClient

    from sgtm_engine.folders import local_tracking_uri

    workdir, _, _ = first_run
    client = MlflowClient(local_tracking_uri(workdir))
    runs = client.search_runs([client.get_experiment_by_name("attack-matrix").experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    sweep = [r for r in runs if r.data.tags.get("sgtm.kind") == "sweep"]
    assert len(sweep) == 1 and sweep[0].info.status == "FINISHED"
    assert "no_filter/attack/steps_to_recovery/mean" in sweep[0].data.metrics
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep[0].info.run_id]
    assert sorted(r.data.tags["sgtm.variant"] for r in cells) == ["no_filter", "sgtm_zero", "weak_filter"]
    stages = [r for r in runs if "sgtm.stage" in r.data.tags]
    assert len(stages) == 6 and all(by_id[r.data.tags["mlflow.parentRunId"]] in cells for r in stages)
    assert all(r.data.tags["sgtm.recipe"] == "attack-matrix" and "sgtm.method" in r.data.tags for r in stages)
    assert list((workdir / "mlartifacts").rglob("MLmodel"))  # the models, in the sweep's own folder


@pytest.mark.slow
def test_a_rerun_skips_succeeded_cells_and_reruns_failed_ones_and_removed_stages(first_run, tiny_matrix, engine_cache):
    from mlflow.tracking import MlflowClient

    from sgtm_engine.folders import local_tracking_uri

    workdir, report, _ = first_run
    sgtm = next(c for c in tiny_matrix.cells if c.variant == "sgtm_zero")
    attack = stage_folders(sgtm, workdir)["attack"]
    stamps = {p.name: (p / "result.json").stat().st_mtime for p in (workdir / "stages").iterdir()}
    # as if the sgtm cell's attack had crashed: no result, the cell marked failed
    (attack / "result.json").unlink()
    cell_file = workdir / "cells" / f"{sgtm.cell_id}.json"
    cell_file.write_text(json.dumps({**json.loads(cell_file.read_text()), "status": "failed"}))
    uri = local_tracking_uri(workdir)
    assert run_sweep(tiny_matrix, workdir, mlflow_uri=uri, cache_dir=engine_cache, echo=print)["n_succeeded"] == 3
    # the rerun's cell goes under the sweep run the first run opened, which ends FINISHED again
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("attack-matrix").experiment_id])
    sweep = [r for r in runs if r.data.tags.get("sgtm.kind") == "sweep"]
    assert len(sweep) == 1 and sweep[0].info.status == "FINISHED"
    reruns = [r for r in runs if r.data.tags.get("sgtm.cell_id") == sgtm.cell_id and "sgtm.stage" not in r.data.tags]
    assert len(reruns) == 2 and {r.data.tags["mlflow.parentRunId"] for r in reruns} == {sweep[0].info.run_id}
    after = {p.name: (p / "result.json").stat().st_mtime for p in (workdir / "stages").iterdir()}
    assert [name for name in stamps if after[name] != stamps[name]] == [attack.name]
    lines: list[str] = []
    again = run_sweep(tiny_matrix, workdir, cache_dir=engine_cache, echo=lines.append)
    assert "3 already succeeded" in lines[0] and len(lines) == 1  # nothing ran
    assert again["tables"] == report["tables"]  # seeded: the rerun attack gives the same numbers
    # a stage folder removed by hand runs again, though its cell had succeeded: the report never misses its result
    shutil.rmtree(attack)
    lines.clear()
    again = run_sweep(tiny_matrix, workdir, cache_dir=engine_cache, echo=lines.append)
    assert "2 already succeeded" in lines[0] and [line.split(":")[0] for line in lines[1:]] == [
        f"attack {cell_label(sgtm)}"]
    assert again["tables"] == report["tables"]


@pytest.mark.slow
def test_two_worker_processes_give_the_same_results_as_one(first_run, tiny_matrix, tmp_path, engine_cache):
    _, report, _ = first_run
    seen: dict[str, list[str]] = {}
    parallel = run_sweep(tiny_matrix, tmp_path, jobs=2, cache_dir=engine_cache, echo=print,
                         events=lambda label: lambda event: seen.setdefault(label, []).append(event["type"]))
    assert parallel["tables"] == report["tables"]
    # each stage's events come back from its worker process, whole: one bar per stage, as with one job
    assert len(seen) == 6 and all(types[0] == "started" and types[-1] == "finished" for types in seen.values())


def _kill_its_worker(folder: Path, times: int) -> threading.Thread:
    """A watcher that SIGKILLs the worker process running the stage of `folder` (the process its lock file names,
    before the stage has written its result), `times` times, as the kernel's out-of-memory killer would."""
    from sgtm_engine.folders import LOCK_FILE

    def watch() -> None:
        killed: set[int] = set()
        deadline = time.monotonic() + 120
        while len(killed) < times and time.monotonic() < deadline:
            named = re.search(r"pid (\d+)", (folder / LOCK_FILE).read_text()) if (folder / LOCK_FILE).exists() else None
            holder = int(named.group(1)) if named else None
            if holder and holder not in killed and not (folder / "result.json").exists():
                os.kill(holder, signal.SIGKILL)
                killed.add(holder)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.mark.slow
def test_a_worker_that_dies_fails_only_its_own_stage(first_run, tiny_matrix, tmp_path, engine_cache):
    """A worker killed mid-stage (SIGKILL, as the out-of-memory killer does: no chance to clean up) takes its pool and
    any stage beside it down; they run again, one at a time, and killed again while it runs alone only that stage
    fails (and the cell that needs it). Its folder, cut off twice, then resumes to the results of an undisturbed run."""
    from mlflow.tracking import MlflowClient

    from sgtm_engine.folders import local_tracking_uri

    _, report, _ = first_run
    sgtm = next(c for c in tiny_matrix.cells if c.variant == "sgtm_zero")
    watcher = _kill_its_worker(stage_folders(sgtm, tmp_path)["train"], times=2)
    lines: list[str] = []
    uri = local_tracking_uri(tmp_path)
    result = run_sweep(tiny_matrix, tmp_path, jobs=2, mlflow_uri=uri, cache_dir=engine_cache, echo=lines.append)
    watcher.join(timeout=1)
    assert result["statuses"] == {"succeeded": 2, "failed": 1}, lines
    error = json.loads((tmp_path / "cells" / f"{sgtm.cell_id}.json").read_text())["error"]
    assert "WorkerDied: its worker process died while running it, twice" in error
    assert [line for line in lines if "FAILED" in line] == [
        f"train {cell_label(sgtm)}: FAILED (WorkerDied: its worker process died while running it, twice (killed "
        "by a signal: the kernel's out-of-memory killer, or a crash in native code))"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("attack-matrix").experiment_id])
    # the killed workers could not end their stage runs: the cell run ended them, none is left RUNNING
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) >= 2 and all(r.data.tags.get("sgtm.stage") for r in killed)
    again = run_sweep(tiny_matrix, tmp_path, cache_dir=engine_cache, echo=lines.append)
    assert again["n_succeeded"] == 3 and again["tables"] == report["tables"]


def test_the_report_pairs_each_final_metric_with_its_unablated_value():
    from sgtm_engine.report import build_report

    metrics = {"eval/retain/loss": 6.1, "eval/forget/loss": 6.2, "eval_calibrated/retain/loss": 6.0,
               "eval_calibrated/forget/loss": 8.3, "eval/capability/forget_es_share": 0.65,
               "eval_calibrated/capability/forget_es_share": 0.0}
    records = [{"cell_id": "a", "variant": "no_filter", "params": {}, "seed": None, "status": "succeeded",
                "stages": {"evaluate": {"kind": "evaluate", "metrics": metrics}}}]
    md = report_markdown(build_report(records))
    assert ("| retain loss, calibrated (unablated) | forget loss, calibrated (unablated) "
            "| forget_es_share, calibrated (unablated) |") in md
    assert "| no_filter | 1/1 | 6.000 (6.100) | 8.300 (6.200) | 0.000 (0.650) |" in md


def test_a_failed_stage_fails_the_stages_after_it_and_nothing_else(monkeypatch, tmp_path):
    import sgtm_engine.local_sweep as local

    ran = []

    def run(task, *_):
        ran.append(task.folder.name)
        if task.folder.name == "train-a":
            raise RuntimeError("out of memory")

    def task(key, after=()):
        inputs = {f"input{i}": tmp_path / parent for i, parent in enumerate(after)}
        return local._Task("train", {}, tmp_path / key, inputs, key, None, {}, "sweep")

    monkeypatch.setattr(local, "_run_task", run)
    tasks = {t.folder.name: t for t in (task("train-a"), task("attack-a", ("train-a",)), task("train-b"),
                                        task("attack-b", ("train-b", "train-done-before")))}
    lines: list[str] = []
    bars: dict[str, list] = {}
    errors = local._run_tasks(tasks, 1, None, "x", None, lines.append, lambda name: bars.setdefault(name, []).append)
    assert ran == ["train-a", "train-b", "attack-b"]  # a stage done in an earlier run counts as done
    assert set(bars) == set(ran)  # each stage run here got its own event callback (its progress bar)
    assert set(errors) == {"train-a", "attack-a"} and errors["attack-a"] == "input train-a failed"
    assert "RuntimeError: out of memory" in errors["train-a"] and "Traceback" in errors["train-a"]
    # the failed stage's bar is told (it cannot send that event itself), and says it instead of a plain line
    assert bars["train-a"] == [{"type": "failed", "error": "RuntimeError: out of memory"}]
    assert not any("FAILED" in line for line in lines)


def test_worker_stages_events_reach_their_bars_from_their_event_logs_before_their_failure(tmp_path):
    """With `--jobs` above 1 the parent follows each stage's events.jsonl (the stage runs in a worker process); a stage
    that fails there has every event it wrote drawn before its `failed`, which only the parent can send."""
    import sgtm_engine.local_sweep as local

    missing = tmp_path / "no-such-stage"  # an input folder without a result: the stage fails once it has started
    tasks = {name: local._Task("evaluate", {}, tmp_path / name, {"model": missing}, name, None, {}, "sweep")
             for name in ("evaluate-a", "evaluate-b")}
    seen: dict[str, list[dict]] = {}
    errors = local._run_tasks(tasks, 2, None, "x", tmp_path / "cache", print,
                              lambda label: seen.setdefault(label, []).append)
    assert set(errors) == set(tasks) and all("no result.json" in error for error in errors.values())
    assert {name: [e["type"] for e in got] for name, got in seen.items()} == {
        name: ["started", "failed"] for name in tasks}
    assert seen["evaluate-a"][0]["kind"] == "evaluate"  # the event as the stage wrote it


def _visible_devices(barrier) -> str:
    """A stage in a worker process that waits until every worker holds one, then says which GPUs it may use."""
    import os

    barrier.wait(timeout=120)
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_parallel_workers_take_a_gpu_each_then_share_them():
    """`--jobs N` on a machine with GPUs: each worker sees one GPU (by the name the parent's CUDA_VISIBLE_DEVICES
    gives it), so parallel stages do not all run on the first one; with more workers than GPUs they share in turn."""
    import multiprocessing

    import sgtm_engine.local_sweep as local

    assert local.gpu_slots(3, ["0", "1"]) == ["0", "1", "0"] and local.gpu_slots(2, []) == []
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(3)
        with local._worker_pool(3, local.gpu_slots(3, ["GPU-a", "GPU-b"])) as pool:
            seen = sorted(pool.map(_visible_devices, [barrier] * 3))
    assert seen == ["GPU-a", "GPU-a", "GPU-b"]


def test_ctrl_c_marks_the_running_stages_and_says_how_to_continue(monkeypatch, tmp_path):
    import sgtm_engine.local_sweep
    import sgtm_engine.runner
    from sgtm_engine.cli import app

    def interrupted(*_, events, **__):
        events("train (variant=sgtm)")({"type": "started", "kind": "train"})
        raise KeyboardInterrupt

    monkeypatch.setattr(sgtm_engine.local_sweep, "run_sweep", interrupted)
    monkeypatch.setattr(sgtm_engine.runner, "run_recipe", interrupted)
    monkeypatch.chdir(tmp_path)
    swept = CliRunner().invoke(app, ["demo", "--quick", "--no-track", "--workdir", "w"])
    assert "train (variant=sgtm): interrupted after" in swept.output and "failed" not in swept.output
    assert "interrupted; the same command continues: succeeded cells are skipped" in " ".join(swept.output.split())
    ran = CliRunner().invoke(app, ["run", "wiki-bilingual-sgtm", "--no-track"])
    folder = next((tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else None
    text = " ".join(ran.output.split())
    assert "interrupted; the same command with --workdir runs/wiki-bilingual-sgtm-" in text, ran.output
    assert "continues: finished stages are kept" in text and folder is None  # nothing ran, so no folder yet
    assert swept.exit_code != 0 and ran.exit_code != 0


def test_jobs_below_one_are_refused_before_anything_runs(tmp_path):
    """`--jobs 0` left the executor waiting on no worker forever, at full CPU."""
    from sgtm_engine.cli import app

    for command in (["sweep", "demo", "--local"], ["demo"], ["attack-matrix"]):
        result = CliRunner().invoke(app, [*command, "--jobs", "0", "--workdir", str(tmp_path / "w")])
        assert result.exit_code == 2 and "--jobs" in result.output, result.output
    with pytest.raises(ConfigError, match="jobs=0: stages run at once; at least 1"):
        run_sweep(load_sweep("demo"), tmp_path / "w", jobs=0)
    assert not (tmp_path / "w").exists()


def test_an_mlflow_uri_with_no_server_behind_it_is_refused_in_seconds(tmp_path):
    """MLflow's client retries a refused connection for minutes (4 min here) before it raises; the sweep says at once
    that nothing answers, and runs nothing."""
    import socket
    import time

    from sgtm_engine.cli import app

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    result = CliRunner().invoke(app, ["sweep", "demo", "--local", "--mlflow-uri", uri, "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and time.monotonic() - started < 30, result.output
    assert f"MLflow store {uri}: no server answers there" in result.output and "--no-track" in result.output
    assert not list((tmp_path / "cells").iterdir()) and not (tmp_path / "stages").exists()
