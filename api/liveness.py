"""What `/ready` checks beyond the ledger's connection: that jobs can actually run and be recorded.

- The embedded executor (`sgtm serve` runs it beside the API) proves it is alive by rewriting
  `<data_root>/executor.heartbeat` (its pid and the time) every `heartbeat_interval_s`: a missing, stale or
  dead-pid heartbeat means submissions would queue forever.
- The ledger must be writable: on SQLite, its folder's disk keeps `min_free_disk_mb` free and is writable; on
  PostgreSQL, the server is not read-only (a replica, or a server that went read-only).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from api.config import Settings
from sgtm_engine.folders import write_json

EXECUTOR_HEARTBEAT = "executor.heartbeat"


def write_executor_heartbeat(data_root: Path) -> None:
    write_json(data_root / EXECUTOR_HEARTBEAT, {"pid": os.getpid(), "at": time.time()})


def executor_check(settings: Settings) -> str:
    """'ok', or why the embedded executor is not running jobs."""
    try:
        record = json.loads((settings.data_root / EXECUTOR_HEARTBEAT).read_text())
        pid, at = int(record["pid"]), float(record["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return "not running: no executor heartbeat; `sgtm serve` starts the executor"
    if not _alive(pid):
        return (f"not running: the executor (pid {pid}) is gone; `sgtm serve` starts it again unless it keeps "
                "dying (then its log says why)")
    age, limit = time.time() - at, max(10.0, 5 * settings.heartbeat_interval_s)
    if age > limit:
        return f"not responding: the executor's last heartbeat is {age:.0f} s old (limit {limit:.0f} s)"
    return "ok"


def ledger_writable_check(settings: Settings, session: Session) -> str:
    """'ok', or why the ledger cannot record a job's progress and results."""
    if session.get_bind().dialect.name == "postgresql":
        if session.execute(text("SHOW transaction_read_only")).scalar() == "on":
            return "read-only: the PostgreSQL server accepts no writes"
        return "ok"
    folder = Path(settings.ledger_url.removeprefix("sqlite:///")).parent
    return disk_check(folder, settings.min_free_disk_mb)


def disk_check(folder: Path, min_free_mb: int) -> str:
    try:
        free_mb = shutil.disk_usage(folder).free // 2**20
    except OSError as e:
        return f"unavailable: {folder}: {e.strerror}"
    if free_mb < min_free_mb:
        return f"disk full: {free_mb} MB free in {folder}, below SGTM_MIN_FREE_DISK_MB={min_free_mb}"
    if not os.access(folder, os.W_OK):
        return f"not writable: {folder}"
    return "ok"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
