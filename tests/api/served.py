"""The API as `uvicorn --factory api.main:create_app` in a process of its own, on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.integration.compose import ServiceProcess, free_port, http_ok, wait_until


@contextmanager
def served_api(env: Mapping[str, str], work: Path) -> Iterator[str]:
    """Yields the API's base URL; `env` holds the SGTM_* settings (the address and log level are added here)."""
    port = free_port()
    full = {**env, "UVICORN_HOST": "127.0.0.1", "UVICORN_PORT": str(port), "UVICORN_LOG_LEVEL": "warning"}
    api = ServiceProcess("api", ["uvicorn", "--factory", "api.main:create_app"], full, work)
    try:
        wait_until(http_ok(f"http://127.0.0.1:{port}/health"), 60, "the API", api.log_tail)
        yield f"http://127.0.0.1:{port}"
    finally:
        api.stop()
