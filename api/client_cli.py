"""Service commands of `sgtm` (registered through the `sgtm.commands` entry point): `serve`, `worker`, `submit`,
`jobs`, `cancel`, `watch`, and for sweeps `sweep`, `sweeps`, `sweep-status`, `sweep-cancel`, `sweep-resume`,
`report`.

`serve` starts the embedded stack: the API on SQLite, the local executor (`python -m workers.local`, the same
supervisor as the Celery workers) and a local MLflow store — one command, nothing to install. `worker` execs a Celery
worker. The client commands talk REST to either mode. The worker side is started by module name, never imported
here (the API package does not import `workers`).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sgtm_engine.config import STAGE_SPECS, StageKind, apply_overrides, apply_stage_overrides, from_dict, to_dict
from sgtm_engine.errors import ConfigError
from sgtm_engine.recipe import find_recipe, load_recipe, read_sweep, recipe_data
from sgtm_engine.sweep import apply_sweep_overrides
from sgtm_engine.yamlio import dump_yaml, load_file, parse_sets

service_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Job service: serve, submit, follow.")
console = Console()
err = Console(stderr=True)

TERMINAL = {"succeeded", "failed", "cancelled"}
EXIT = {"succeeded": 0, "failed": 1, "cancelled": 3}

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

    data_root = data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SGTM_MODE="embedded", SGTM_DATA_ROOT=str(data_root))
    if not env.get("SGTM_API_TOKENS"):
        env["SGTM_API_TOKENS"] = _ensure_token(data_root)
    os.environ.update(env)  # create_app (uvicorn factory) reads the same settings
    settings = Settings()
    upgrade(settings.ledger_url)
    executor = subprocess.Popen([sys.executable, "-m", "workers.local"], env=env)
    console.print(f"[bold]sgtm[/] embedded: API http://{host}:{port} (docs at /docs), data in {data_root}")
    console.print(f"  token: {data_root / 'token'} (or SGTM_API_TOKENS)")
    if settings.tracking_uri:
        console.print(f"  MLflow: mlflow ui --backend-store-uri {settings.tracking_uri}")
    try:
        import uvicorn

        uvicorn.run("api.main:create_app", factory=True, host=host, port=port, log_level="info")
    finally:
        if executor.poll() is None:
            executor.send_signal(signal.SIGTERM)  # the running job checkpoints and is requeued for the next start
            try:
                executor.wait(timeout=settings.cancel_grace_s + 20)
            except subprocess.TimeoutExpired:
                executor.kill()


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
    with _client(url, token, data_root) as client:
        r = _request(client, "POST", path, json=body,
                     headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})
        data = r.json()
        jobs = data["jobs"] if "jobs" in data else [data]
        what = f"pipeline {data['id']}" if "jobs" in data else f"job {data['id']}"
        console.print(f"submitted {what}: " + ", ".join(f"{j.get('stage_name') or j['kind']}={j['id']}"
                                                          for j in jobs))
        if watch:
            raise typer.Exit(_follow(client, [j["id"] for j in jobs]))


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
    with _client(url, token, data_root) as client:
        items = _request(client, "GET", "/api/v1/jobs", params=params).json()["items"]
    table = Table("id", "kind", "stage", "status", "progress", "method", "created", "error")
    for j in items:
        p = j.get("progress") or {}
        progress = f"{p.get('step')}/{p.get('total')}" if p.get("total") else ""
        error = (j.get("error") or {}).get("type", "") if j["status"] != "succeeded" else ""
        table.add_row(j["id"], j["kind"], j.get("stage_name") or "", j["status"], progress, j["method"],
                      j["created_at"][:19], error)
    console.print(table)


@service_app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="a job id (or a pipeline id with --pipeline)")],
           pipeline: Annotated[bool, typer.Option("--pipeline", help="cancel every stage of a pipeline")] = False,
           url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Cancel a job: queued ones at once, running ones stop at their next step (SIGTERM, then SIGKILL)."""
    path = f"/api/v1/{'pipelines' if pipeline else 'jobs'}/{job_id}/cancel"
    with _client(url, token, data_root) as client:
        data = _request(client, "POST", path).json()
    for j in data.get("jobs", [data]):
        console.print(f"{j['id']}: {j['status']}{' (cancel requested)' if j.get('cancel_requested_at') else ''}")


@service_app.command()
def watch(job_ids: Annotated[list[str], typer.Argument(help="job ids, or one pipeline id with --pipeline")],
          pipeline: Annotated[bool, typer.Option("--pipeline", help="watch every stage of a pipeline")] = False,
          url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Follow jobs with progress bars until they finish; exit 0/1/3 on succeeded/failed/cancelled."""
    with _client(url, token, data_root) as client:
        if pipeline:
            job_ids = [j["id"] for j in _request(client, "GET", f"/api/v1/pipelines/{job_ids[0]}").json()["jobs"]]
        raise typer.Exit(_follow(client, job_ids))


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
    with _client(url, token, data_root) as client:
        data = _request(client, "POST", "/api/v1/sweeps", json=body,
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
    with _client(url, token, data_root) as client:
        items = _request(client, "GET", "/api/v1/sweeps", params={"limit": limit}).json()["items"]
    table = Table("id", "name", "status", "cells", "created")
    for s in items:
        table.add_row(s["id"], s["name"], s["status"], _counts(s["counts"]), s["created_at"][:19])
    console.print(table)


@service_app.command("sweep-status")
def sweep_status(sweep_id: Annotated[str, typer.Argument(help="a sweep id")],
                 url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Every cell of a sweep: variant, grid values, seed, status, pipeline."""
    with _client(url, token, data_root) as client:
        data = _request(client, "GET", f"/api/v1/sweeps/{sweep_id}").json()
    _print_sweep(data)


@service_app.command("sweep-cancel")
def sweep_cancel(sweep_id: Annotated[str, typer.Argument(help="a sweep id")],
                 url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Cancel every queued or running job of every cell of a sweep."""
    with _client(url, token, data_root) as client:
        data = _request(client, "POST", f"/api/v1/sweeps/{sweep_id}/cancel").json()
    console.print(f"sweep {data['id']}: {_counts(data['counts'])}")


@service_app.command("sweep-resume")
def sweep_resume(sweep_id: Annotated[str, typer.Argument(help="a sweep id")],
                 wait: Annotated[bool, typer.Option("--wait", help="poll until every cell finished")] = False,
                 url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, data_root: DataRootOpt = Path(".sgtm")) -> None:
    """Run again only the failed or cancelled cells of a sweep."""
    with _client(url, token, data_root) as client:
        data = _request(client, "POST", f"/api/v1/sweeps/{sweep_id}/resume").json()
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

    out.mkdir(parents=True, exist_ok=True)
    with _client(url, token, data_root) as client:
        data = _request(client, "GET", f"/api/v1/sweeps/{sweep_id}/report").json()
        (out / "report.md").write_text(data["markdown"])
        (out / "report.json").write_text(json.dumps(data["report"], indent=1, sort_keys=True))
        for name, link in data["figures"].items():
            (out / f"{name}.png").write_bytes(_request(client, "GET", link).content)
    console.print(data["markdown"])
    console.print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(data['figures'])} figures to {out}")


def _load_sweep(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """A sweep file (a path or a name in recipes/sweeps/) with `--set` applied."""
    return apply_sweep_overrides(read_sweep(recipe), parse_sets(overrides))


def _wait_sweep(client: httpx.Client, sweep_id: str) -> int:
    last = ""
    while True:
        data = _request(client, "GET", f"/api/v1/sweeps/{sweep_id}").json()
        line = _counts(data["counts"])
        if line != last:
            console.print(f"{time.strftime('%H:%M:%S')} sweep {sweep_id[:8]}: {line}")
            last = line
        if data["status"] in TERMINAL:
            _print_sweep(data)
            return EXIT[data["status"]]
        time.sleep(3.0)


def _print_sweep(data: dict[str, Any]) -> None:
    table = Table("#", "variant", "params", "seed", "status", "reused", "pipeline", "error")
    for c in data["cells"]:
        params = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in c["params"].items())
        error = (c.get("error") or {}).get("type", "") if c["status"] != "succeeded" else ""
        table.add_row(str(c["position"]), c.get("variant") or "", params, str(c.get("seed")), c["status"],
                      "yes" if c["reused"] else "", c["pipeline_id"][:8], error)
    console.print(table)
    console.print(f"sweep {data['id']} ({data['name']}): {data['status']}; {_counts(data['counts'])}")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no cells"


# ---------------------------------------------------------------------------------------------------------------------


def _follow(client: httpx.Client, job_ids: list[str]) -> int:
    """Progress bars from the job rows (polled: one request per job per second, robust to reconnects)."""
    final: dict[str, dict[str, Any]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as progress:
        tasks = {job_id: progress.add_task(job_id[:8], total=None, info="") for job_id in job_ids}
        while len(final) < len(job_ids):
            for job_id in job_ids:
                if job_id in final:
                    continue
                job = _request(client, "GET", f"/api/v1/jobs/{job_id}").json()
                p = job.get("progress") or {}
                loss = (job.get("last_metrics") or {}).get("train/loss")
                info = job["status"] + (f" loss {loss:.3f}" if isinstance(loss, float) else "")
                progress.update(tasks[job_id], description=f"{job.get('stage_name') or job['kind']} {job_id[:8]}",
                                total=p.get("total"), completed=p.get("step") or 0, info=info)
                if job["status"] in TERMINAL:
                    final[job_id] = job
            time.sleep(1.0)
    for job in final.values():
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            err.print(f"{job['id']}: {job['status']} ({error.get('type')}): {(error.get('message') or '')[-500:]}")
    return max(EXIT[j["status"]] for j in final.values())


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
        raise ConfigError(f"kind={body.get('kind')!r}: must be one of {[k.value for k in StageKind]}") from None
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


def _client(url: str, token: str | None, data_root: Path) -> httpx.Client:
    if token is None and (data_root / "token").exists():
        token = (data_root / "token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30.0)


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Retries connection failures (submissions carry an Idempotency-Key, so a retry never duplicates a job)."""
    for attempt in range(4):
        try:
            r = client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            if attempt == 3:
                err.print(f"cannot reach {client.base_url}: {e}")
                raise typer.Exit(2) from None
            time.sleep(0.5 * 2**attempt)
            continue
        if r.status_code >= 400:
            _explain(r)
            raise typer.Exit(2)
        return r
    raise AssertionError("unreachable")


def _explain(r: httpx.Response) -> None:
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text
    if isinstance(detail, list):
        err.print(f"[red]{r.status_code}[/]: the request is invalid:")
        for problem in detail:
            where = ".".join(str(p) for p in problem.get("loc", []) if p != "body")
            err.print(f"  - {where}: {problem.get('msg')}")
    else:
        err.print(f"[red]{r.status_code}[/]: {detail}")


if __name__ == "__main__":
    service_app()
