"""The CLI's side of the REST API: one client per command, requests that retry a lost connection, errors printed as
one readable line per problem (never a traceback), and the consoles every client command prints to."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

#: A finished job's status -> the exit code of a command that followed it.
TERMINAL = {"succeeded", "failed", "cancelled"}
EXIT = {"succeeded": 0, "failed": 1, "cancelled": 3}


def connect(url: str, token: str | None, data_root: Path) -> httpx.Client:
    """A client for the API at `url`, with `token` (default: embedded mode's `<data_root>/token`)."""
    if token is None and (data_root / "token").exists():
        token = (data_root / "token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30.0)


def request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Retries connection failures (submissions carry an Idempotency-Key, so a retry never duplicates a job); an
    error response is explained and exits 2."""
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
            explain(r)
            raise typer.Exit(2)
        return r
    raise AssertionError("unreachable")


def explain(r: httpx.Response) -> None:
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text
    if isinstance(detail, list):
        err.print(f"[red]{r.status_code}[/]: the request is invalid:")
        for problem in detail:  # each msg names its field
            err.print(f"  - {problem.get('msg')}", markup=False)
    else:
        err.print(f"[red]{r.status_code}[/]: {detail}")
