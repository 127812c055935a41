"""Run folders on disk: making one, holding it for one process at a time, writing a JSON record into it so that
readers never see half of it, the files a stage leaves for whoever runs it (its result, its error and its event log,
which a process running the stage elsewhere follows), and the MLflow store a folder keeps (which moves with the
folder).

Stdlib only: the service's client, API and worker parent use these too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sgtm_engine.errors import ConfigError, FolderInUse

log = logging.getLogger(__name__)


def make_folder(path: Path, field: str = "workdir") -> Path:
    """`path` as a folder, created with its parents when missing; a ConfigError naming `field` when it cannot be one
    (a file of that name, a parent that is a file, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{field}={str(path)!r}: a file, not a folder; name a folder (created when missing)"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{field}={str(path)!r}: cannot create the folder ({exc.strerror}); name another") from exc
    return path


#: The file a folder's holder locks (`hold_folder`); it says who holds it.
LOCK_FILE = ".sgtm.lock"


@contextlib.contextmanager
def hold_folder(folder: Path, holder: str) -> Iterator[None]:
    """Hold `folder` for this process while the block runs. Another process that asks for it meanwhile (a second
    `sgtm sweep` on the same folder, a duplicate job) gets `FolderInUse` naming the holder, instead of two runs writing
    one folder. The lock is the kernel's (flock), so it ends with the process however that ends: nothing stale is
    left to clean up."""
    with open(folder / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FolderInUse(f"{folder} is in use by {f.read().strip() or 'another process'}; wait for it to end (or "
                              "stop it), or use another folder") from None
        f.truncate(0)
        f.write(f"{holder} (pid {os.getpid()})")
        f.flush()
        yield


def write_json(path: Path, payload: Any) -> None:
    """Atomically: readers see the old file or the whole new one. The temporary file is this process's own, so
    torchrun's ranks recording the same error at once do not rename each other's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, sort_keys=True))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------------
# What a stage leaves in its folder for whoever runs it (`sgtm run`, a local sweep, the service's supervisor):
# `result.json` when it finished, `error.json` when `run-stage` failed, and its events (`stage.py` lists them), one
# JSON object a line in `events.jsonl`

RESULT, ERROR, EVENTS = "result.json", "error.json", "events.jsonl"


class EventLog:
    """Appends a stage's events to its `events.jsonl`, each line written whole and the file closed after it, so a
    process following the file (`EventTail`) has every event the stage sent once the stage returns; and forwards
    them to `forward`."""

    def __init__(self, folder: Path, forward: Callable[[dict[str, Any]], None] | None = None):
        self.path = folder / EVENTS
        self.forward = forward

    def __call__(self, event: dict[str, Any]) -> None:
        event = {"t": time.time(), **event}
        with open(self.path, "a") as f:
            f.write(json.dumps(event, default=str) + "\n")
        if self.forward:
            self.forward(event)


class EventTail:
    """Follows an `events.jsonl` from where it ends when this is made (the events of earlier attempts are old). A
    line may be half-written when read: an unterminated end is kept for the next read. Lines that are not JSON
    objects are skipped (and counted), never fatal."""

    def __init__(self, path: Path, *, from_end: bool = True):
        self.path = path
        self.offset = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""
        self.skipped = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        events = []
        for line in filter(bytes.strip, lines):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                events.append(event)
            else:
                self.skipped += 1
                log.warning("skipping a malformed line in %s", self.path)
        return events


# ---------------------------------------------------------------------------------------------------------------------
# The MLflow store a folder keeps (a run folder of `sgtm run` or `sgtm sweep --local`, the embedded service's data root)


_STORE, _ARTIFACTS = "mlflow.db", "mlartifacts"


def local_store_file(root: str | Path) -> Path:
    """The folder's SQLite store (MLflow's file store is deprecated); its artifacts are in `local_artifact_root`."""
    return Path(root).resolve() / _STORE


def local_tracking_uri(root: str | Path) -> str:
    """`local_store_file(root)` as MLflow's tracking URI."""
    return f"sqlite:///{local_store_file(root)}"


def local_artifact_root(root: str | Path) -> Path:
    """Where the experiments of `local_tracking_uri(root)` keep their artifacts (logged models included)."""
    return Path(root).resolve() / _ARTIFACTS


def experiment_location(artifact_root: Path, experiment: str) -> str:
    """The artifact location an experiment is created with under `artifact_root`: `<artifact_root>/<experiment>`."""
    return (artifact_root / experiment).resolve().as_uri()


#: The columns of MLflow's SQL schema (mlflow 3.17, pinned) that hold artifact locations.
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def repoint_local_store(root: str | Path) -> Path | None:
    """Point the store of a folder that moved (or was copied) at the folder's own artifacts again.

    MLflow records artifact locations as absolute URIs and has no API to change them, so at a new place the store
    would list its runs but not their artifacts, and a resumed run would write its artifacts back at the old place.
    Every location under an old `mlartifacts` (`experiment_location`'s) is rewritten to the same path under
    `local_artifact_root(root)`, in one transaction. Returns the folder the store was at, or None when it points here
    already (or `root` holds no store).
    """
    db = local_store_file(root)
    if not db.exists():
        return None
    here = local_artifact_root(root).as_uri()
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        marker = f"/{_ARTIFACTS}/"
        roots = {f"{loc.rpartition(marker)[0]}/{_ARTIFACTS}"
                 for (loc,) in con.execute("SELECT artifact_location FROM experiments")
                 if loc and loc.startswith("file://") and marker in loc}
        old = sorted(roots - {here})
        for before in old:
            for table, column in (tc for tc in _LOCATION_COLUMNS if tc[0] in tables):
                con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - our constants
                            f"WHERE substr({column}, 1, ?) = ?", (here, len(before) + 1, len(before) + 1,
                                                                  before + "/"))
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(old[0]).path)).parent if old else None
