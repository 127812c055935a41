"""`sgtm`: run recipes and stages in-process, the demo, and export. Service commands plug in as entry points.

Engine commands live here; `serve`, `worker`, `submit`, `jobs`, `cancel`, `watch` come from the service package
through the `sgtm.commands` entry-point group, so the engine never imports the service (architecture.md).
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from sgtm_engine.errors import EXIT_UNEXPECTED, ConfigError, SgtmError

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
) -> None:
    """Run one stage; exit code per sgtm_engine.errors. Used by the service's supervisor."""
    from sgtm_engine.pipeline import error_record, run_stage, write_json
    from sgtm_engine.runtime import StopFlag, setup_logging
    from sgtm_engine.tracking import MlflowTracker, NullTracker

    setup_logging()
    workdir.mkdir(parents=True, exist_ok=True)
    stop = StopFlag().install()
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
                      cache_dir=cache_dir)
        finally:
            tracker.flush()
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded for the supervisor, then re-mapped
        if isinstance(exc, typer.Exit):
            raise
        write_json(workdir / "error.json", error_record(exc))
        if not isinstance(exc, SgtmError):
            log.exception("stage failed")
        _fail(exc)


# ---------------------------------------------------------------------------------------------------------------------
# run: a recipe in-process


@app.command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="a recipe file or the name of one in recipes/")],
    workdir: Annotated[Path, typer.Option(help="where stages write (one folder per stage)")] = Path("runs/latest"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="STAGE.field=value (a YAML value; a mapping merges "
                                                                 "into the block), repeatable")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the resolved recipe (YAML, every "
                                                                      "default filled in) and run nothing")] = False,
    mlflow_uri: Annotated[str | None, typer.Option(help="default: a SQLite store in the workdir")] = None,
    no_track: Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")] = False,
    cache_dir: Annotated[Path, typer.Option(help="content-addressed data cache")] = DEFAULT_CACHE,
) -> None:
    """Run every stage of a recipe in this process and write WORKDIR/result.json."""
    from sgtm_engine.recipe import load_recipe, recipe_data
    from sgtm_engine.yamlio import dump_yaml, parse_sets

    try:
        parsed = load_recipe(recipe, parse_sets(set_ or []))
    except SgtmError as exc:
        _fail(exc)
    if print_config:
        typer.echo(dump_yaml(recipe_data(parsed)), nl=False)
        return
    from sgtm_engine.runner import run_recipe
    from sgtm_engine.runtime import setup_logging

    setup_logging()
    try:
        results = run_recipe(parsed, workdir, mlflow_uri=None if no_track else mlflow_uri, track=not no_track,
                             cache_dir=cache_dir)
    except SgtmError as exc:
        _fail(exc)
    typer.echo(f"wrote {workdir / 'result.json'} ({len(results['stages'])} stages)")


# ---------------------------------------------------------------------------------------------------------------------
# demo and export


@app.command("demo")
def demo_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="a 2-minute version")] = False,
    workdir: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    cache_dir: Annotated[Path, typer.Option(help="content-addressed data cache")] = DEFAULT_CACHE,
) -> None:
    """Filter vs gradient routing vs SGTM on wiki-bilingual with 2% of the Spanish unlabelled."""
    from sgtm_engine.demo import run_demo
    from sgtm_engine.runtime import setup_logging

    setup_logging(level=logging.WARNING)
    try:
        run_demo(workdir, quick=quick, cache_dir=cache_dir)
    except SgtmError as exc:
        _fail(exc)


@app.command("attack-matrix")
def attack_matrix_cmd(
    workdir: Annotated[Path, typer.Option(help="one folder per stage, plus the table and plot")] = Path(
        "runs/attack_matrix"),
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
    corpus: Annotated[str, typer.Option(help="wiki-bilingual or wiki-bio (which adds the strict filter)")] = (
        "wiki-bilingual"),
    rows: Annotated[str | None, typer.Option(help="comma-separated rows (default: all)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="train.|attack.|rmu.FIELD=value, repeatable")] = None,
    jobs: Annotated[int, typer.Option(help="seeds run in parallel processes")] = 1,
    report_only: Annotated[bool, typer.Option("--report-only", help="only redraw the table and plot")] = False,
    dump_recipe: Annotated[Path | None, typer.Option(help="write the matrix as a recipe YAML and exit")] = None,
    cache_dir: Annotated[Path, typer.Option(help="content-addressed data cache")] = DEFAULT_CACHE,
) -> None:
    """Attack every method with the same fine-tuning attack over several seeds; one table and one plot."""
    import time

    from sgtm_engine.matrix import (
        MatrixSpec,
        matrix_recipe,
        recipe_as_data,
        recipe_yaml,
        run_matrix,
        with_overrides,
        write_report,
    )
    from sgtm_engine.runtime import setup_logging
    from sgtm_engine.yamlio import parse_sets

    setup_logging()
    started = time.perf_counter()
    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
        row_list = tuple(r.strip() for r in rows.split(",")) if rows else None
        spec = with_overrides(MatrixSpec(seeds=seed_list, corpus=corpus, rows=row_list),
                              parse_sets(set_ or []))
        if dump_recipe is not None:
            dump_recipe.write_text(recipe_yaml(recipe_as_data(matrix_recipe(spec))))
            typer.echo(f"wrote {dump_recipe}")
            return
        if report_only:
            report = write_report(spec, workdir)
        else:
            report = run_matrix(spec, workdir, cache_dir=cache_dir, jobs=jobs, emit=typer.echo)
    except (SgtmError, ValueError) as exc:
        _fail(exc)
    typer.echo("\n" + report["table"])
    typer.echo(f"\nplot: {report['plot']}; all numbers: {workdir / 'attack_matrix.json'}; "
               f"took {time.perf_counter() - started:.0f} s")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a stage workdir (with result.json) or a checkpoint folder")],
    out: Annotated[Path, typer.Option(help="output folder: a stock-transformers model + tokenizer")],
    ablate: Annotated[str | None, typer.Option(help="zero or reinit: ablate the forget slice first")] = None,
    seed: Annotated[int, typer.Option(help="re-init ablation seed")] = 0,
    drop_output_bias: Annotated[bool, typer.Option(help="zero lm_head.bias (stock GPT-Neo cannot hold it)")] = False,
) -> None:
    """Write a model loadable with `AutoModelForCausalLM.from_pretrained` (and its tokenizer)."""
    from sgtm_engine.export import export_model

    try:
        path = export_model(checkpoint, out, ablate=ablate, seed=seed, drop_output_bias=drop_output_bias)
    except SgtmError as exc:
        _fail(exc)
    typer.echo(f"exported to {path}")


def _load_plugins() -> None:
    """Commands other packages register under the `sgtm.commands` entry-point group (the service's)."""
    for ep in entry_points(group="sgtm.commands"):
        try:
            plugin = ep.load()
        except (ImportError, AttributeError) as exc:  # service extra absent: no service commands
            log.debug("skipping sgtm command plugin %s: %s", ep.name, exc)
            continue
        for command in getattr(plugin, "registered_commands", []):
            app.registered_commands.append(command)


def main() -> None:
    _load_plugins()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
