"""Service commands of `sgtm` (registered through the `sgtm.commands` entry point): `serve`, `worker`, `submit`,
`jobs`, `show`, `logs`, `cancel`, `watch`, and for sweeps `sweep`, `sweeps`, `sweep-status`, `sweep-cancel`,
`sweep-resume`, `report`.

`serve` starts the embedded stack: the API on SQLite, the local executor (`python -m workers.local`, the same
supervisor as the Celery workers, started again if it dies: api.embedded) and a local MLflow store — one command,
nothing to install. `worker` execs a Celery worker. The client commands talk REST to either mode. The worker side is
started by module name, never imported here (the API package does not import `workers`).
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.table import Table

from api.client_http import EXIT, TERMINAL, connect, console, err, request
from api.client_jobs import follow, jobs_table, show_job
from api.embedded import ExecutorKeeper
from sgtm_engine.config import (
    STAGE_SPECS,
    StageKind,
    apply_overrides,
    apply_stage_overrides,
    from_dict,
    to_dict,
    unknown_choice,
)
from sgtm_engine.errors import ConfigError
from sgtm_engine.folders import make_folder
from sgtm_engine.recipe import find_recipe, load_recipe, read_sweep, recipe_data
from sgtm_engine.sweep import apply_sweep_overrides
from sgtm_engine.yamlio import dump_yaml, load_file, parse_sets

service_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Job service: serve, submit, follow.")

UrlOpt = Annotated[str, typer.Option(envvar="SGTM_URL", help="API base URL")]
TokenOpt = Annotated[str | None, typer.Option(envvar="SGTM_TOKEN", help="bearer token (default: <data root>/token)")]
DataRootOpt = Annotated[Path, typer.Option(envvar="SGTM_DATA_ROOT", help="embedded mode's data folder")]
DEFAULT_URL = "http://127.0.0.1:8000"


# ---------------------------------------------------------------------------------------------------------------------
# Servers


@service_app.command()
def serve(host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="port")] = 8000,
          data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Embedded mode: API (SQLite ledger) + local executor + local MLflow store, in one command."""
    from api.config import Settings
    from api.migrate import upgrade

    try:
        data_root = make_folder(data_root.resolve(), "--data-root")
    except ConfigError as exc:
        _invalid(exc)
    env = dict(os.environ, SGTM_MODE="embedded", SGTM_DATA_ROOT=str(data_root))
    if not env.get("SGTM_API_TOKENS"):
        env["SGTM_API_TOKENS"] = _ensure_token(data_root)
    os.environ.update(env)  # create_app (uvicorn factory) reads the same settings
    settings = Settings()
    upgrade(settings.ledger_url)
    executor = ExecutorKeeper([sys.executable, "-m", "workers.local", "--stdin-lifeline"], env)
    executor.start()
    console.print(f"[bold]sgtm[/] embedded: API http://{host}:{port} (docs at /docs), data in {data_root}")
    console.print(f"  token: {data_root / 'token'} (or SGTM_API_TOKENS)")
    if settings.tracking_uri:  # the data root's own store, or the server named
        console.print(f"  MLflow: {settings.mlflow_tracking_uri or f'sgtm ui {data_root}'}")
    try:
        import uvicorn

        uvicorn.run("api.main:create_app", factory=True, host=host, port=port, log_level="info",
                    log_config=serve_log_config())
    finally:
        executor.stop(grace_s=settings.cancel_grace_s + 20)


class QuietReads(logging.Filter):
    """Drops the access-log lines of reads that succeeded (GET/HEAD below 400): clients following jobs poll and
    stream, health checks probe, and a console of those hides the submissions, cancels and errors it should show."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's access record: (client, method, path, HTTP version, status code)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[4], int):
            return not (args[1] in ("GET", "HEAD") and args[4] < 400)
        return True


def serve_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with successful reads left out of the access log (`QuietReads`)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["quiet_reads"] = {"()": "api.client_cli.QuietReads"}
    config["handlers"]["access"]["filters"] = ["quiet_reads"]
    return config


@service_app.command()
def worker(queues: Annotated[str | None, typer.Option(help="comma-separated: gpu, cpu (default SGTM_WORKER_QUEUES)")]
           = None,
           reaper: Annotated[bool, typer.Option("--reaper", help="run beat + the reaper (control queue) instead")]
           = False,
           loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO") -> None:
    """A Celery worker (deployed mode): one job at a time per process; `--reaper` for the beat/reaper process."""
    env = dict(os.environ)
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--loglevel", loglevel]
    if reaper:
        env["SGTM_WORKER_QUEUES"] = "control"
        argv += ["-B", "--max-tasks-per-child", "1000"]
    elif queues:
        env["SGTM_WORKER_QUEUES"] = queues
    os.execvpe(argv[0], argv, env)


# ---------------------------------------------------------------------------------------------------------------------
# Client


@service_app.command()
def submit(recipe: Annotated[str, typer.Argument(help="a recipe/job YAML file, or a recipe name in recipes/")],
           watch: Annotated[bool, typer.Option("--watch", help="follow progress until it finishes")] = False,
           set_: Annotated[list[str] | None, typer.Option("--set", help="STAGE.field=value (a YAML value; a "
                                                                       "mapping merges into the block)")] = None,
           print_config: Annotated[bool, typer.Option("--print-config", help="print the resolved body (YAML, every "
                                                                             "default filled in); send nothing")]
           = False,
           experiment: Annotated[str | None, typer.Option(help="MLflow experiment")] = None,
           idempotency_key: Annotated[str | None, typer.Option(help="default: a fresh key (safe retries)")] = None,
           url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Submit a recipe (`stages:` → a pipeline) or one job (`kind:`); with --watch, exit 0/1/3 on
    succeeded/failed/cancelled."""
    try:
        body = _load_body(recipe, set_ or [])
        if experiment:
            body["experiment"] = experiment
        if print_config:
            typer.echo(dump_yaml(_resolved(body)), nl=False)
            return
    except ConfigError as e:
        _invalid(e)
    path = "/api/v1/pipelines" if "stages" in body else "/api/v1/jobs"
    with connect(url, token, data_root) as client:
        r = request(client, "POST", path, json=body,
                     headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})
        data = r.json()
        jobs = data["jobs"] if "jobs" in data else [data]
        what = f"pipeline {data['id']}" if "jobs" in data else f"job {data['id']}"
        console.print(f"submitted {what}: " + ", ".join(f"{j.get('stage_name') or j['kind']}={j['id']}"
                                                          for j in jobs))
        if watch:
            raise typer.Exit(follow(client, [j["id"] for j in jobs]))


@service_app.command()
def jobs(status: Annotated[list[str] | None, typer.Option(help="queued, running, succeeded, failed, cancelled")]
         = None,
         kind: Annotated[list[str] | None, typer.Option(help="train, ablate, evaluate, attack, rmu")] = None,
         pipeline: Annotated[str | None, typer.Option(help="a pipeline id")] = None,
         limit: Annotated[int, typer.Option(help="rows")] = 20,
         url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit, "status": status or [], "kind": kind or []}
    if pipeline:
        params["pipeline_id"] = pipeline
    with connect(url, token, data_root) as client:
        items = request(client, "GET", "/api/v1/jobs", params=params).json()["items"]
    console.print(jobs_table(items, console.width))


@service_app.command()
def show(job_id: Annotated[str, typer.Argument(help="a job id, or a unique prefix of 8+ characters")],
         as_json: Annotated[bool, typer.Option("--json", help="print the job as the API returns it")] = False,
         url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """One job: status, progress, metrics, MLflow run, workdir and spec."""
    with connect(url, token, data_root) as client:
        job = request(client, "GET", f"/api/v1/jobs/{job_id}").json()
    if as_json:
        console.print_json(data=job)
    else:
        show_job(job)


@service_app.command()
def logs(job_id: Annotated[str, typer.Argument(help="a job id, or a unique prefix of 8+ characters")],
         attempt: Annotated[int | None, typer.Option(help="which attempt (default: the latest)")] = None,
         tail: Annotated[int, typer.Option(help="bytes from the end of the log")] = 64 * 1024,
         url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """The engine's output (stdout and stderr) of a job's attempt."""
    params: dict[str, Any] = {"tail": tail, **({"attempt": attempt} if attempt else {})}
    with connect(url, token, data_root) as client:
        r = request(client, "GET", f"/api/v1/jobs/{job_id}/logs", params=params)
    size, shown = int(r.headers.get("X-Log-Size", 0)), len(r.content)
    if size > shown:
        err.print(f"[dim]… the last {shown} of {size} bytes (--tail for more)[/]")
    sys.stdout.write(r.text)
    sys.stdout.flush()


@service_app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="a job id (or a pipeline id with --pipeline)")],
           pipeline: Annotated[bool, typer.Option("--pipeline", help="cancel every stage of a pipeline")] = False,
           url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Cancel a job: queued ones at once, running ones stop at their next step (SIGTERM, then SIGKILL)."""
    path = f"/api/v1/{'pipelines' if pipeline else 'jobs'}/{job_id}/cancel"
    with connect(url, token, data_root) as client:
        data = request(client, "POST", path).json()
    for j in data.get("jobs", [data]):
        console.print(f"{j['id']}: {j['status']}{' (cancel requested)' if j.get('cancel_requested_at') else ''}")


@service_app.command()
def watch(job_ids: Annotated[list[str], typer.Argument(help="job ids (or unique prefixes of 8+ characters), or "
                                                           "one pipeline id with --pipeline")],
          pipeline: Annotated[bool, typer.Option("--pipeline", help="watch every stage of a pipeline")] = False,
          url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Follow jobs with progress bars (their server-sent events) until they finish; exit 0/1/3 on
    succeeded/failed/cancelled."""
    with connect(url, token, data_root) as client:
        if pipeline:
            job_ids = [j["id"] for j in request(client, "GET", f"/api/v1/pipelines/{job_ids[0]}").json()["jobs"]]
        raise typer.Exit(follow(client, job_ids))


# ---------------------------------------------------------------------------------------------------------------------
# Sweeps


@service_app.command()
def sweep(recipe: Annotated[str, typer.Argument(help="a sweep YAML (kind: sweep), or its name in recipes/sweeps/")],
          set_: Annotated[list[str] | None, typer.Option("--set", help="top-level key, or base STAGE.field=value "
                                                                      "(YAML value), e.g. train.steps=100")] = None,
          wait: Annotated[bool, typer.Option("--wait", help="poll until every cell finished; exit 0 when all "
                                                            "succeeded, 1 if any failed, 3 if any was cancelled")]
          = False,
          experiment: Annotated[str | None, typer.Option(help="MLflow experiment")] = None,
          idempotency_key: Annotated[str | None, typer.Option(help="default: a fresh key (safe retries)")] = None,
          url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Submit a sweep: cells that already succeeded are reused, running ones attached, failed ones rerun."""
    try:
        body = _load_sweep(recipe, set_ or [])
    except ConfigError as e:
        _invalid(e)
    if experiment:
        body["experiment"] = experiment
    with connect(url, token, data_root) as client:
        data = request(client, "POST", "/api/v1/sweeps", json=body,
                        headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex}).json()
        reused = sum(1 for c in data["cells"] if c["reused"])
        console.print(f"submitted sweep {data['id']}: {len(data['cells'])} cells ({_counts(data['counts'])}; "
                      f"{reused} reused from earlier submissions)")
        if wait:
            raise typer.Exit(_wait_sweep(client, data["id"]))


@service_app.command()
def sweeps(limit: Annotated[int, typer.Option(help="rows")] = 20,
           url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """List sweeps, newest first."""
    with connect(url, token, data_root) as client:
        items = request(client, "GET", "/api/v1/sweeps", params={"limit": limit}).json()["items"]
    table = Table("id", "name", "status", "cells", "created")
    for s in items:
        table.add_row(s["id"], s["name"], s["status"], _counts(s["counts"]), s["created_at"][:19])
    console.print(table)


@service_app.command("sweep-status")
def sweep_status(sweep_id: Annotated[str, typer.Argument(help="a sweep id")],
                 url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Every cell of a sweep: variant, grid values, seed, status, pipeline."""
    with connect(url, token, data_root) as client:
        data = request(client, "GET", f"/api/v1/sweeps/{sweep_id}").json()
    _print_sweep(data)


@service_app.command("sweep-cancel")
def sweep_cancel(sweep_id: Annotated[str, typer.Argument(help="a sweep id")],
                 url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Cancel every queued or running job of every cell of a sweep."""
    with connect(url, token, data_root) as client:
        data = request(client, "POST", f"/api/v1/sweeps/{sweep_id}/cancel").json()
    console.print(f"sweep {data['id']}: {_counts(data['counts'])}")


@service_app.command("sweep-resume")
def sweep_resume(sweep_id: Annotated[str, typer.Argument(help="a sweep id")],
                 wait: Annotated[bool, typer.Option("--wait", help="poll until every cell finished")] = False,
                 url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Run again only the failed or cancelled cells of a sweep."""
    with connect(url, token, data_root) as client:
        data = request(client, "POST", f"/api/v1/sweeps/{sweep_id}/resume").json()
        console.print(f"sweep {data['id']}: {_counts(data['counts'])}")
        if wait:
            raise typer.Exit(_wait_sweep(client, data["id"]))


@service_app.command()
def report(sweep_id: Annotated[str, typer.Argument(help="a sweep id")],
           out: Annotated[Path, typer.Option(help="folder for report.md, report.json and the figures")]
           = Path("report"),
           url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Fetch a sweep's report (tables over seeds, mean ± std, n) and its figures into OUT."""
    import json

    try:
        make_folder(out, "--out")
    except ConfigError as exc:
        _invalid(exc)
    with connect(url, token, data_root) as client:
        data = request(client, "GET", f"/api/v1/sweeps/{sweep_id}/report").json()
        (out / "report.md").write_text(data["markdown"])
        (out / "report.json").write_text(json.dumps(data["report"], indent=1, sort_keys=True))
        for name, link in data["figures"].items():
            (out / f"{name}.png").write_bytes(request(client, "GET", link).content)
    console.print(data["markdown"])
    console.print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(data['figures'])} figures to {out}")


def _load_sweep(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """A sweep file (a path or a name in recipes/sweeps/) with `--set` applied."""
    return apply_sweep_overrides(read_sweep(recipe), parse_sets(overrides))


def _wait_sweep(client: httpx.Client, sweep_id: str) -> int:
    last = ""
    try:
        while True:
            data = request(client, "GET", f"/api/v1/sweeps/{sweep_id}").json()
            line = _counts(data["counts"])
            if line != last:
                console.print(f"{time.strftime('%H:%M:%S')} sweep {sweep_id[:8]}: {line}")
                last = line
            if data["status"] in TERMINAL:
                _print_sweep(data)
                return EXIT[data["status"]]
            time.sleep(3.0)
    except KeyboardInterrupt:  # only the waiting stops: say so, and where the sweep is followed from now
        err.print(f"stopped waiting; the service keeps running sweep {sweep_id}. Its cells: sgtm sweep-status "
                  f"{sweep_id}; stop it: sgtm sweep-cancel {sweep_id}", highlight=False, soft_wrap=True)
        raise


def _print_sweep(data: dict[str, Any]) -> None:
    table = Table("#", "variant", "params", "seed", "status", "reused", "pipeline", "error")
    for c in data["cells"]:
        params = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in c["params"].items())
        error = (c.get("error") or {}).get("type", "") if c["status"] != "succeeded" else ""
        seed = "" if c.get("seed") is None else str(c["seed"])  # a sweep without seeds keeps the base's
        table.add_row(str(c["position"]), c.get("variant") or "", params, seed, c["status"],
                      "yes" if c["reused"] else "", c["pipeline_id"][:8], error)
    console.print(table)
    console.print(f"sweep {data['id']} ({data['name']}): {data['status']}; {_counts(data['counts'])}")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no cells"


# ---------------------------------------------------------------------------------------------------------------------


def _load_body(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """A recipe (`stages:`) or a single job (`kind:`) with `--set` applied: `train.steps=5` sets stage `train`'s
    spec.steps in a recipe, `steps=5` the spec of a single job."""
    path = find_recipe(recipe)
    data = load_file(path)
    if not isinstance(data, dict) or not ("stages" in data or "kind" in data):
        raise ConfigError(f"{path}: expected a recipe (a 'stages' list) or a job (a 'kind')")
    sets = parse_sets(overrides)
    if "stages" in data:
        data["stages"] = apply_stage_overrides(data["stages"], sets)
    else:
        data.pop("description", None)  # a job file may describe itself; JobCreate takes only what runs
        data["spec"] = apply_overrides(data.get("spec") or {}, sets)
    return data


def _resolved(body: dict[str, Any]) -> dict[str, Any]:
    """What the service will run: the body validated by the engine's schema, every default filled in."""
    if "stages" in body:
        return recipe_data(load_recipe(body))
    try:
        kind = StageKind(body.get("kind"))
    except ValueError:
        raise ConfigError(unknown_choice(("kind",), body.get("kind"), [k.value for k in StageKind])) from None
    return {**body, "kind": kind.value, "spec": to_dict(from_dict(STAGE_SPECS[kind], body.get("spec") or {}))}


def _invalid(exc: ConfigError) -> NoReturn:
    """Bad input is one line per problem, no traceback; exit 2 (the engine's config-error code)."""
    typer.echo(exc.report(), err=True)
    raise typer.Exit(exc.exit_code)

def _ensure_token(data_root: Path) -> str:
    path = data_root / "token"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


if __name__ == "__main__":
    service_app()
