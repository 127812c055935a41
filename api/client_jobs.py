"""What the CLI shows of jobs: following them live from their event streams (`sgtm watch`, `submit --watch`), the
`sgtm jobs` table and `sgtm show`.

Choices made here:
- `follow` reads each job's server-sent events (`GET /api/v1/jobs/{id}/events`), one reader thread per job, and
  draws them with the engine's stage bars (`sgtm_engine.progress`), so a job the service runs looks like a stage
  `sgtm run` runs. A dropped connection, or the server's hourly end of a stream, is resumed from the last event id
  (`Last-Event-ID`); the stream's `done` event carries the finished job.
- Ids are shown whole (people copy them; a unique prefix of 8 or more characters is accepted too); a narrow terminal
  gets fewer columns, never cut ones.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from api.client_http import EXIT, console, err, explain, request
from sgtm_engine.progress import StageBars, headline

READ_TIMEOUT_S = 120.0  # the server sends a keep-alive comment while a job is quiet, so this only catches a dead link
RECONNECT_S = (0.5, 1.0, 2.0, 4.0, 8.0)


# ---------------------------------------------------------------------------------------------------------------------
# Following jobs


def follow(client: httpx.Client, job_ids: list[str]) -> int:
    """Show the jobs' progress until every one has finished; returns the exit code of the worst outcome (0 succeeded,
    1 failed, 3 cancelled). Ids may be unique prefixes."""
    jobs = [request(client, "GET", f"/api/v1/jobs/{job_id}").json() for job_id in job_ids]
    final: dict[str, dict[str, Any]] = {}
    try:
        with StageBars(console) as bars:
            readers = [threading.Thread(target=_follow_one, args=(client, job, bars, final), daemon=True)
                       for job in jobs]
            for reader in readers:
                reader.start()
            for reader in readers:
                while reader.is_alive():
                    reader.join(0.5)  # a join with a timeout keeps Ctrl-C working
    except KeyboardInterrupt:  # only the watching stops: say so, and how to pick it up again
        left = [j["id"] for j in jobs if j["id"] not in final]
        if left:
            err.print(f"stopped watching; the service keeps running {len(left)} job(s). Follow them again: "
                      f"sgtm watch {' '.join(left)}; stop one: sgtm cancel ID", highlight=False, soft_wrap=True)
        raise
    for job in final.values():
        if job["status"] != "succeeded":
            err.print(f"{job['id']}: {job['status']} ({_error_line(job)})")
    return max((EXIT[j["status"]] for j in final.values()), default=2)


def _follow_one(client: httpx.Client, job: dict[str, Any], bars: StageBars, final: dict[str, dict[str, Any]]
                ) -> None:
    job_id, label = job["id"], f"{job.get('stage_name') or job['kind']} {job['id'][:8]}"
    bars.note(label, job["status"])
    last_id, failures = None, 0
    while job_id not in final:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            with client.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=headers,
                               timeout=httpx.Timeout(30.0, read=READ_TIMEOUT_S)) as r:
                if r.status_code >= 400:
                    r.read()
                    explain(r)
                    final[job_id] = {**job, "status": "failed", "error": {"type": f"HTTP {r.status_code}"}}
                    return
                for event_id, kind, data in _sse(r.iter_lines()):
                    last_id, failures = event_id or last_id, 0
                    _show(bars, label, kind, data, final)
        except httpx.TransportError as e:
            if failures == len(RECONNECT_S):
                final[job_id] = {**job, "status": "failed", "error": {"type": type(e).__name__, "message": str(e)}}
                return
            time.sleep(RECONNECT_S[failures])
            failures += 1


def _show(bars: StageBars, label: str, kind: str, data: dict[str, Any], final: dict[str, dict[str, Any]]) -> None:
    """Draw one event of a job: a state change, one of the engine's events, or the finished job (`done`)."""
    if kind == "done":
        final[data["id"]] = data
        bars.end(label, data["status"], _error_line(data))
    elif kind == "status":
        bars.note(label, str((data.get("data") or {}).get("status", "")))
    else:
        bars.update(label, data.get("data") or {"type": kind})


def _error_line(job: dict[str, Any]) -> str:
    """The error's type and the last line of its message (a log tail's last line is where the cause is)."""
    error = job.get("error") or {}
    lines = (error.get("message") or "").strip().splitlines()
    return f"{error.get('type')}: {lines[-1] if lines else ''}" if error else ""


def _sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) of each server-sent event; comments (keep-alive pings) are skipped."""
    event_id, kind, data = None, "message", []
    for line in lines:
        if not line:
            if data:
                yield event_id, kind, json.loads("\n".join(data))
            event_id, kind, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = value
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)


# ---------------------------------------------------------------------------------------------------------------------
# Tables


#: `sgtm jobs` columns beyond the four always shown, in the order they are given up when the terminal is narrow.
_OPTIONAL = ("error", "method", "created")


def jobs_table(items: list[dict[str, Any]], width: int) -> Table:
    """`sgtm jobs` for a terminal `width` wide: the id whole, stage, status and progress always; then the error,
    method and creation time while they fit. The stage is the stage's name, with its kind when that differs."""
    rows = []
    for j in items:
        p = j.get("progress") or {}
        stage = j.get("stage_name") or j["kind"]
        rows.append({"id": j["id"], "stage": stage if stage == j["kind"] else f"{stage} ({j['kind']})",
                     "status": j["status"], "progress": f"{p.get('step')}/{p.get('total')}" if p.get("total") else "",
                     "error": (j.get("error") or {}).get("type", "") if j["status"] != "succeeded" else "",
                     "method": j["method"], "created": j["created_at"][5:16].replace("T", " ")})
    order = ["id", "stage", "status", "progress", "method", "created", "error"]
    names = order[:4]
    need = {n: max([len(n), *(len(r[n]) for r in rows)]) + 3 for n in order}  # + padding and the gap
    for name in _OPTIONAL[::-1]:  # the creation time first, the error last
        if any(r[name] for r in rows) and sum(need[n] for n in names) + need[name] + 1 <= width:
            names.append(name)
    names.sort(key=order.index)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in names:
        table.add_column(name, no_wrap=name != "error", overflow="fold" if name == "error" else "ellipsis",
                         min_width=36 if name == "id" else None)
    for r in rows:
        table.add_row(*(r[n] for n in names))
    return table


def show_job(job: dict[str, Any], out: Console = console) -> None:
    """`sgtm show`: what a job is (spec), where it stands, what it measured, and where to look further."""
    p = job.get("progress") or {}
    rows = [("id", job["id"]), ("kind", job["kind"]), ("stage", job.get("stage_name")),
            ("pipeline", job.get("pipeline_id")), ("status", job["status"]), ("method", job["method"]),
            ("seed", job.get("seed")), ("progress", f"{p.get('step')}/{p.get('total')}" if p.get("total") else None),
            ("attempt", f"{job['attempt']} of {job['max_attempts']}"),
            ("inputs", ", ".join(f"{k}={v}" for k, v in job.get("inputs", {}).items())),
            ("created", job["created_at"]), ("started", job.get("started_at")), ("finished", job.get("finished_at")),
            ("spec hash", job["spec_hash"]), ("code version", job.get("code_version")),
            ("workdir", job.get("workdir")), ("MLflow", _mlflow_line(job.get("mlflow"))),
            ("error", _error_line(job) if job["status"] != "succeeded" else None)]
    for name, value in rows:
        if value not in (None, ""):  # soft wrap: a long path or id stays one line to copy
            out.print(f"[bold]{name:<13}[/]{value}", soft_wrap=True, highlight=False)
    metrics = job.get("last_metrics") or {}
    table = headline(metrics, title="metrics")
    if table is not None:
        out.print(table)
    elif metrics:
        out.print("metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in sorted(metrics.items())))
    out.print("spec:")
    out.print_json(data=job["spec"])


def _mlflow_line(ref: dict[str, Any] | None) -> str | None:
    if not ref:
        return None
    return ref.get("url") or f"run {ref['run_id']} (experiment {ref.get('experiment_id')})"
