"""Architecture rules that a unit test can check: the API and the worker parent never import torch (or the
engine's internals), and nothing connects at import time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("torch", "transformers", "sgtm_engine.model", "sgtm_engine.stage", "sgtm_engine.train")


@pytest.mark.parametrize(("module", "also_forbidden"), [
    ("api.main", ("mlflow", "workers", "celery")),
    ("api.client_cli", ("mlflow", "workers", "fastapi")),
    ("workers.tasks", ("fastapi", "mlflow")),  # mlflow is imported when a run store is built, in the pool process
    ("workers.local", ("fastapi",)),
])
def test_importing_a_service_module_does_not_import_torch(module: str, also_forbidden: tuple[str, ...],
                                                         tmp_path: Path) -> None:
    code = (f"import sys, {module}\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN + also_forbidden!r} "
            f"or m in {FORBIDDEN!r})\n"
            "assert not bad, bad\n")
    # SGTM_ variables of the caller must not matter; an unreachable database must not matter either
    env = {"PATH": "/usr/bin:/bin", "SGTM_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",
           "SGTM_BROKER_URL": "redis://127.0.0.1:1/0", "SGTM_DATA_ROOT": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
