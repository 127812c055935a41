"""`sgtm`: run recipes, stages, sweeps and the demo in-process, export models, serve a run folder's MLflow UI.

Engine commands live here; `serve`, `worker`, `submit`, `jobs`, `cancel`, `watch` come from the service package
through the `sgtm.commands` entry-point group, so the engine never imports the service (docs/architecture.md).
`sweep` is the engine's: `--local` runs the cells here, and without it the command hands over to the service's own
`sweep` (found through the same entry point), so one command serves both.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from sgtm_engine.errors import EXIT_CANCELLED, EXIT_UNEXPECTED, ConfigError, SgtmError
from sgtm_engine.recipe import SWEEP_DIR

if TYPE_CHECKING:
    from sgtm_engine.runtime import StopFlag  # torch: the CLI imports it only in the commands that run stages

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
log = logging.getLogger("sgtm")

DEFAULT_CACHE = Path.home() / ".cache" / "sgtm"


def _fail(exc: BaseException) -> NoReturn:
    if isinstance(exc, ConfigError):
        typer.echo(exc.report(), err=True)
    else:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    raise typer.Exit(exc.exit_code if isinstance(exc, SgtmError) else EXIT_UNEXPECTED)


# ---------------------------------------------------------------------------------------------------------------------
# run-stage: the engine child the service supervises


@app.command("run-stage")
def run_stage_cmd(
    kind: Annotated[str, typer.Option(help="train, ablate, evaluate, attack or rmu")],
    spec: Annotated[Path, typer.Option(help="the stage spec as JSON", exists=True, dir_okay=False)],
    workdir: Annotated[Path, typer.Option(help="the stage's folder (resumes from its checkpoint)")],
    input: Annotated[list[str] | None, typer.Option(help="NAME=PARENT_WORKDIR, repeatable")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    mlflow_run_id: Annotated[str | None, typer.Option(help="log into this (supervisor-owned) run")] = None,
    cache_dir: Annotated[Path, typer.Option(help="content-addressed data cache")] = DEFAULT_CACHE,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over if WORKDIR holds a run of another "
                                                                "spec (else that is refused)")] = False,
    stdin_lifeline: Annotated[float | None, typer.Option(
        help="stdin is the parent's lifeline: at its end of file (the parent is gone) stop as on SIGTERM, and exit "
             "at most this many seconds later")] = None,
) -> None:
    """Run one stage; exit code per sgtm_engine.errors. Used by the service's supervisor."""
    from sgtm_engine.folders import ERROR, make_folder, write_json
    from sgtm_engine.runtime import StopFlag, setup_logging
    from sgtm_engine.stage import error_record, run_stage
    from sgtm_engine.tracking import MlflowTracker, NullTracker

    setup_logging()
    try:
        make_folder(workdir)
    except ConfigError as exc:  # no folder to record error.json in: the exit code and stderr say it
        _fail(exc)
    stop = StopFlag().install()
    if stdin_lifeline is not None:
        _stop_when_orphaned(stop, stdin_lifeline)
    try:
        inputs = {}
        for pair in input or []:
            if "=" not in pair:
                raise ConfigError(f"--input {pair!r}: expected NAME=DIR")
            name, path = pair.split("=", 1)
            inputs[name] = Path(path)
        tracker = MlflowTracker(mlflow_uri, run_id=mlflow_run_id) if mlflow_uri and mlflow_run_id else NullTracker()
        try:
            run_stage(kind, json.loads(spec.read_text()), workdir, inputs, tracker=tracker, stop=stop,
                      cache_dir=cache_dir, overwrite=overwrite)
        finally:
            tracker.flush()
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded for the supervisor, then re-mapped
        if isinstance(exc, typer.Exit):
            raise
        write_json(workdir / ERROR, error_record(exc))
        if not isinstance(exc, SgtmError):
            log.exception("stage failed")
        _fail(exc)


def _stop_when_orphaned(stop: StopFlag, grace_s: float) -> None:
    """When the parent is gone nobody will read this stage's outcome, and a new attempt waits for its workdir: stop
    as on SIGTERM (a checkpoint at the next step boundary), and exit after `grace_s` if no boundary comes."""
    import time

    from sgtm_engine.lifeline import watch_stdin

    def orphaned() -> None:
        log.warning("stdin closed: the parent process is gone; stopping at the next step boundary")
        stop.requested = True
        time.sleep(grace_s)  # a daemon thread: the process ends without waiting for it once the stage has stopped
        log.error("no step boundary within %.0f s of losing the parent; exiting", grace_s)
        os._exit(EXIT_CANCELLED)

    watch_stdin(orphaned)


# ---------------------------------------------------------------------------------------------------------------------
# run: a recipe in-process


@app.command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="a recipe file or the name of one in recipes/")],
    workdir: Annotated[Path | None, typer.Option(help="where stages write, one folder per stage (default: a new "
                                                      "runs/<recipe>-<time>-<spec hash> per run)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="STAGE.field=value (a YAML value; a mapping merges "
                                                                 "into the block), repeatable")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start over in stage folders that hold a run of "
                                                                "another spec (else they are refused)")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the resolved recipe (YAML, every "
                                                                      "default filled in) and run nothing")] = False,
    mlflow_uri: Annotated[str | None, typer.Option(help="default: a SQLite store in the workdir")] = None,
    no_track: Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")] = False,
    cache_dir: Annotated[Path, typer.Option(help="content-addressed data cache")] = DEFAULT_CACHE,
    register: Annotated[str | None, typer.Option(help="register the recipe's final model in the MLflow model "
                                                      "registry under this name (sets <stage>.register)")] = None,
) -> None:
    """Run every stage of a recipe in this process and write WORKDIR/result.json."""
    from sgtm_engine.config import spec_hash, unknown_corpora
    from sgtm_engine.recipe import load_recipe, recipe_data
    from sgtm_engine.yamlio import dump_yaml, parse_sets

    try:
        overrides = parse_sets(set_ or [])
        parsed = load_recipe(recipe, overrides)
        # this process knows only the built-in corpora: a misspelt name fails here, not minutes into a stage
        corpora = [p.nested((s.name,)) for s in parsed.stages for p in unknown_corpora(s.spec)]
        if corpora:
            raise ConfigError(corpora)
        if register is not None:
            from sgtm_engine.runner import register_last_model

            overrides = {**overrides, **register_last_model(parsed, register)}
            parsed = load_recipe(recipe, overrides)
    except SgtmError as exc:
        _fail(exc)
    if print_config:
        typer.echo(dump_yaml(recipe_data(parsed)), nl=False)
        return
    from sgtm_engine.progress import StageBars
    from sgtm_engine.runner import run_recipe
    from sgtm_engine.runtime import setup_logging

    resume = "the same command"  # continues the run in its folder
    if workdir is None:
        workdir = fresh_run_folder(parsed)
        resume += f" with --workdir {workdir}"
    run_name = " ".join([parsed.name, *(set_ or []), f"({spec_hash(recipe_data(parsed))[:8]})"])
    with StageBars() as bars:
        setup_logging(level=logging.WARNING, handler=bars.log_handler())  # the bars say what INFO lines would
        _mlflow_warnings_only()
        bars.console.print(f"[bold]{parsed.name}[/]: {len(parsed.stages)} stages in {workdir}")
        try:
            results = run_recipe(parsed, workdir, mlflow_uri=None if no_track else mlflow_uri, track=not no_track,
                                 cache_dir=cache_dir, overwrite=overwrite, events=bars.stage, run_name=run_name)
        except BaseException as exc:  # the bars mark the stage that was running; the error is printed once, below
            _stopped(bars, exc, f"{resume} continues: {KEPT_ON_RESUME}")
            if isinstance(exc, SgtmError):
                _fail(exc)
            raise
    _summary(bars.console, workdir, results)


#: What a rerun of an interrupted `run` or `sweep` keeps.
KEPT_ON_RESUME = "finished stages are kept, and a stage cut off resumes from its last checkpoint"


def _stopped(bars, exc: BaseException, resume: str) -> None:
    """Mark the stages that were running as ended by `exc`; after Ctrl-C, say how to continue."""
    if isinstance(exc, KeyboardInterrupt):
        bars.end_running("interrupted")
        bars.console.print(f"interrupted; {resume}", highlight=False)
    else:
        bars.end_running("failed", type(exc).__name__)


def _mlflow_warnings_only() -> None:
    """MLflow's INFO lines (creating its tables, one per run) would tear the bars and say nothing the bars do not; a
    level the user set wins. An environment variable, because MLflow sets its logger's level when it is imported."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _summary(console, workdir: Path, results: dict) -> None:
    """The headline metrics of the run's last evaluation, where everything went, and how to look at it."""
    from sgtm_engine.progress import headline

    evaluated = [(name, r) for name, r in results["stages"].items() if headline(r.get("metrics") or {})]
    if evaluated:
        name, result = evaluated[-1]
        console.print(headline(result["metrics"], title=f"{results['recipe']}: stage {name}"))
    console.print(f"run folder: {workdir} (result.json: every stage's record)", highlight=False)
    if results.get("mlflow_uri"):
        console.print(_mlflow_hint(results["mlflow_uri"], workdir), highlight=False, soft_wrap=True)


def _mlflow_hint(uri: str, workdir: Path) -> str:
    """How to look at the runs: the folder's own store through `sgtm ui`, another store where it is."""
    from sgtm_engine.folders import local_tracking_uri

    if uri == local_tracking_uri(workdir):
        return f"MLflow: sgtm ui {workdir}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow: {uri}"
    return f"MLflow: mlflow ui --backend-store-uri {uri}"


def fresh_run_folder(recipe) -> Path:
    """`runs/<recipe>-<UTC time>-<short spec hash>`: readable, sortable, and never another run's folder."""
    import time

    from sgtm_engine.config import spec_hash
    from sgtm_engine.recipe import recipe_data

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("runs") / f"{recipe.name}-{stamp}-{spec_hash(recipe_data(recipe))[:8]}"


# ---------------------------------------------------------------------------------------------------------------------
# sweep (local, or submitted to the service), and its aliases demo and attack-matrix

#: `sgtm demo --quick`: recipes/sweeps/demo.yaml with these overrides: every stage kind and both tables, at a size
#: that only checks everything runs (held-out evaluation covers every category, so its batches are kept small). Both
#: trained models get the same ones, so the no-filter model stays the attacks' shared reference.
_QUICK_TRAIN = ("steps=20", "batch_size=8", "optim.warmup_steps=5", "eval_every=null",
                "eval={max_batches: 1, batch_size: 4}")
DEMO_QUICK = ("name=demo-quick", *(f"{stage}.{pair}" for stage in ("reference", "train") for pair in _QUICK_TRAIN),
              "evaluate.calibrate={steps: 5, batch_size: 4}",
              "evaluate.eval={max_batches: 1, batch_size: 4, n_samples: 4, sample_tokens: 8}",
              "attack.steps=10", "attack.eval_every=5", "attack.batch_size=8", "attack.optim.warmup_steps=2",
              "attack.eval.batch_size=4")
#: Corpora with an adjacent split: only there does a strict filter train a different model than the weak one.
CORPORA_WITH_ADJACENT = ("wiki-bio", "wikipedia-ores")


#: runs/demo for the demo, runs/demo-quick for its smoke version: a quick check never overwrites the demo's report
SweepWorkdirOpt = Annotated[Path | None, typer.Option(help="output folder; default: runs/<sweep name>")]
JobsOpt = Annotated[int, typer.Option(min=1, help="stages run at once (above 1: each in its own process)")]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")]
CacheOpt = Annotated[Path, typer.Option(help="content-addressed data cache")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="STAGE.field=value, or a top-level key: seeds=\\[0], "
                                                                "variants=\\[a,b] (keeps those); repeatable")]


@app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep_cmd(
    ctx: typer.Context,
    sweep: Annotated[str, typer.Argument(help="a sweep YAML (kind: sweep), or its name in recipes/sweeps/")],
    local: Annotated[bool, typer.Option("--local", help="run the cells here, resumably")] = False,
    set_: SetOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the cells' resolved stages, run "
                                                                      "nothing")] = False,
    jobs: JobsOpt = 1,
    workdir: SweepWorkdirOpt = None,
    no_track: NoTrackOpt = False,
    mlflow_uri: Annotated[str | None, typer.Option(help="default: a SQLite store in the workdir")] = None,
    cache_dir: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Run a sweep: with --local its cells run here, without it the service runs them.

    Submitted to the service, the service's other `sweep` options (--wait, --url, --token, ...) pass through."""
    if not local and not print_config:
        if jobs != 1 or workdir or no_track or mlflow_uri:
            _fail(ConfigError("--jobs, --workdir, --no-track and --mlflow-uri apply to --local runs; the service "
                              "decides these for submitted sweeps"))
        submit = _SHADOWED.get("sweep")  # the service's own `sweep` command
        if submit is None:
            _fail(ConfigError("sgtm sweep without --local submits to the service, which is not installed here; "
                              "add --local to run the cells locally"))
        shadow = typer.Typer()
        shadow.registered_commands.append(submit)
        typer.main.get_command(shadow)([sweep, *(a for p in set_ or [] for a in ("--set", p)), *ctx.args],
                                       prog_name="sgtm sweep")  # exits with the service command's code
    if ctx.args:
        _fail(ConfigError(f"{ctx.args}: not options of `sgtm sweep --local`"))
    _sweep_local(sweep, set_ or [], workdir, jobs, no_track, mlflow_uri, cache_dir, print_config=print_config)


@app.command("demo")
def demo_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="a 2-minute version")] = False,
    workdir: SweepWorkdirOpt = None,
    set_: SetOpt = None, jobs: JobsOpt = 1, no_track: NoTrackOpt = False, cache_dir: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Filter vs gradient routing vs SGTM on wiki-bilingual, 2% of the Spanish unlabelled (sweep file `demo`)."""
    _sweep_local(str(SWEEP_DIR / "demo.yaml"), [*(DEMO_QUICK if quick else ()), *(set_ or [])], workdir, jobs,
                 no_track, None, cache_dir)


@app.command("attack-matrix")
def attack_matrix_cmd(
    workdir: SweepWorkdirOpt = None,
    corpus: Annotated[str, typer.Option(help="wiki-bilingual, or wiki-bio (adds the strict filter)")] = (
        "wiki-bilingual"),
    set_: SetOpt = None, jobs: JobsOpt = 1, no_track: NoTrackOpt = False, cache_dir: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Every method, then the same fine-tuning attack, over several seeds (sweep file `attack-matrix`)."""
    def defaults(data: dict) -> dict:
        out = {"reference.data.corpus": corpus, "train.data.corpus": corpus}
        if corpus not in CORPORA_WITH_ADJACENT:
            out["variants"] = [v for v in data["variants"] if v != "strict_filter"]
        return out

    _sweep_local(str(SWEEP_DIR / "attack-matrix.yaml"), set_ or [], workdir, jobs, no_track, None, cache_dir,
                 defaults=defaults)


def _sweep_local(name: str, pairs: Sequence[str], workdir: Path | None, jobs: int, no_track: bool,
                 mlflow_uri: str | None, cache_dir: Path, *, defaults: Callable[[dict], dict] = lambda data: {},
                 print_config: bool = False) -> None:
    """Expand the sweep file with the overrides (`defaults` first, then `--set`), then print or run its cells."""
    import time

    from sgtm_engine.folders import local_tracking_uri
    from sgtm_engine.local_sweep import cells_yaml, load_sweep, run_sweep
    from sgtm_engine.report import report_markdown
    from sgtm_engine.yamlio import parse_sets

    started = time.perf_counter()
    try:
        sweep = load_sweep(name, parse_sets(list(pairs)), defaults)
        if print_config:
            typer.echo(cells_yaml(sweep), nl=False)
            return
        from sgtm_engine.progress import StageBars
        from sgtm_engine.runtime import setup_logging

        workdir = workdir or Path("runs") / sweep.name
        uri = None if no_track else (mlflow_uri or local_tracking_uri(workdir))
        with StageBars() as bars:  # one bar per stage, from worker processes too (--jobs above 1)
            setup_logging(level=logging.WARNING, handler=bars.log_handler())
            _mlflow_warnings_only()
            try:
                report = run_sweep(sweep, workdir, jobs=jobs, mlflow_uri=uri, cache_dir=cache_dir,
                                   echo=lambda line: bars.console.print(line, markup=False, highlight=False),
                                   events=bars.stage)
            except BaseException as exc:
                _stopped(bars, exc, f"the same command continues: succeeded cells are skipped, {KEPT_ON_RESUME}")
                raise
    except SgtmError as exc:
        _fail(exc)
    typer.echo("\n" + report_markdown(report))
    figures = ", ".join(str(workdir / file) for file in report["figures"].values())
    typer.echo(f"figures: {figures or 'none'}; all numbers: {workdir / 'report.json'}")
    if uri:
        typer.echo(_mlflow_hint(uri, workdir))
    typer.echo(f"took {(time.perf_counter() - started) / 60:.1f} min")
    raise typer.Exit(0 if report["n_succeeded"] == report["n_cells"] else 1)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a stage workdir (with result.json) or a checkpoint folder")],
    out: Annotated[Path, typer.Option(help="output folder: a stock-transformers model + tokenizer")],
    ablate: Annotated[str | None, typer.Option(help="zero or reinit: ablate the forget slice first")] = None,
    seed: Annotated[int, typer.Option(help="re-init ablation seed")] = 0,
    drop_output_bias: Annotated[bool, typer.Option(help="omit the output bias (kept by default in "
                                                        "output_bias.safetensors; see the model card)")] = False,
    calibrated: Annotated[bool, typer.Option("--calibrated", help="the calibrated model of an evaluate stage "
                                                                  "(CHECKPOINT is its workdir)")] = False,
    positions: Annotated[int | None, typer.Option(help="rows of the position table, so stock generate runs past "
                                                       "the context (default: 4 x context)")] = None,
) -> None:
    """Write a model loadable with `AutoModelForCausalLM.from_pretrained`, its tokenizer and a model card."""
    from sgtm_engine.export import export_model

    try:
        path = export_model(checkpoint, out, ablate=ablate, seed=seed, drop_output_bias=drop_output_bias,
                            calibrated=calibrated, positions=positions)
    except SgtmError as exc:
        _fail(exc)
    typer.echo(f"exported to {path}")


@app.command("ui", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ui_cmd(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="a run folder of sgtm run, sweep --local, demo or attack-matrix")],
    host: Annotated[str, typer.Option(help="the network interface to serve on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="the port to serve on")] = 5000,
) -> None:
    """Serve a run folder's MLflow store in MLflow's UI (a folder that moved is re-pointed at its own artifacts).

    Other options pass through to `mlflow ui` (`--allowed-hosts` when serving beyond this machine with `--host
    0.0.0.0`)."""
    from sgtm_engine.folders import local_store_file, local_tracking_uri, repoint_local_store
    from sgtm_engine.tracking import mlflow_offline_defaults

    if not local_store_file(folder).is_file():
        run = next((p for p in folder.resolve().parents if local_store_file(p).is_file()), None)  # a stage's folder
        fix = f"did you mean {run}, the run folder it is in?" if run else "name the folder a run or sweep wrote"
        _fail(ConfigError(f"FOLDER={folder}: holds no MLflow store ({local_store_file(folder).name}); {fix}"))
    moved_from = repoint_local_store(folder)
    if moved_from is not None:
        typer.echo(f"{folder} was at {moved_from}: its MLflow store now points at the artifacts here")
    typer.echo(f"MLflow UI of {folder}: http://{host}:{port}")
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", local_tracking_uri(folder), "--host", host,
            "--port", str(port), *ctx.args]
    mlflow_offline_defaults()
    os.execv(argv[0], argv)  # the UI is MLflow's own server; Ctrl-C stops it


#: Plugin commands named like an engine command: the engine's wins and may delegate (`sweep` without --local).
_SHADOWED: dict[str, typer.models.CommandInfo] = {}


def _load_plugins() -> None:
    """Commands other packages register under the `sgtm.commands` entry-point group (the service's)."""
    ours = {c.name or c.callback.__name__ for c in app.registered_commands}
    for ep in entry_points(group="sgtm.commands"):
        try:
            plugin = ep.load()
        except (ImportError, AttributeError) as exc:  # service extra absent: no service commands
            log.debug("skipping sgtm command plugin %s: %s", ep.name, exc)
            continue
        for command in getattr(plugin, "registered_commands", []):
            if (command.name or command.callback.__name__) in ours:
                _SHADOWED[command.name or command.callback.__name__] = command
            else:
                app.registered_commands.append(command)


def main() -> None:
    _load_plugins()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
