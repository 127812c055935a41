"""Run docker-compose.yml's services natively: the same command and environment as the container, with only the
addresses changed (loopback ports, a per-session database, Redis DB and queue prefix, temp folders).

No Docker engine runs here; this keeps the compose file and the tested stack from drifting apart.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_compose(variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file with `${VAR}`, `${VAR:-default}` and `${VAR:?error}` interpolated as compose does."""
    values = dict(variables or {})

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if values.get(name):
            return values[name]
        if op in (":?", "?"):
            raise KeyError(f"compose variable {name} is required: {arg}")
        return arg or ""

    text = _VAR.sub(substitute, COMPOSE_FILE.read_text().replace("$$", "\0")).replace("\0", "$")
    return yaml.safe_load(text)


def service_command(name: str, variables: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a compose service."""
    service = load_compose(variables)["services"][name]
    env = {str(k): str(v) for k, v in (service.get("environment") or {}).items()}
    return [str(part) for part in service["command"]], env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """A compose service's command run natively in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path = ROOT):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"  # `celery`, `mlflow`, … of the venv
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the group, SIGKILL after `timeout`."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)
        if self.alive():
            self.proc.wait(10)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.proc.wait(10)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               on_timeout: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.25)
    detail = on_timeout() if on_timeout else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n{detail}")


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2.0).status_code == 200
