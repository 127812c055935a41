"""Each image installs what its code imports. A fresh virtual environment gets exactly the API image's
requirements (`docker/requirements.py … service report`, as docker/Dockerfile installs them) and the repository's
code on its path, nothing else: the API starts, serves its offline docs, takes a submission and renders a sweep
report with figures, and torch is not importable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.compose import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCRIPT = r'''
import importlib.util, sys, tempfile
from pathlib import Path
assert importlib.util.find_spec("torch") is None, "the API image must not need torch"
from fastapi.testclient import TestClient
from api.config import Settings
from api.liveness import write_executor_heartbeat
from api.main import create_app
from api.migrate import upgrade
from api.reports import render

work = Path(tempfile.mkdtemp())
url = f"sqlite:///{work / 'ledger.db'}"
upgrade(url)
token = "t" * 40
settings = Settings(_env_file=None, database_url=url, data_root=work, api_tokens=[token], tracking=False)
write_executor_heartbeat(work)
with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as client:
    assert client.get("/ready").status_code == 200
    assert "cdn" not in client.get("/docs").text
    r = client.post("/api/v1/jobs", json={"kind": "train", "spec": {"steps": 10}})
    assert r.status_code == 202, r.text
history = [{"step": s, "metrics": {"eval/retain/loss": 5.0 - s / 10, "eval/forget/loss": 6.0 - s / 20}}
           for s in (0, 5)]
records = [{"cell_id": f"c{recall}-{seed}", "variant": None, "params": {"train.noise.recall": recall}, "seed": seed,
            "status": "succeeded",
            "stages": {"train": {"kind": "train", "history": history,
                                 "metrics": {"eval/retain/loss": 4.0 + seed, "eval/forget/loss": 5.0 + recall}}}}
           for recall in (0.5, 1.0) for seed in (0, 1)]
rendered = render(settings, "00000000-0000-4000-8000-000000000000", records)
assert rendered.figures(), rendered.report
print("ok", rendered.figures())
'''


def test_the_api_image_requirements_run_the_api_and_render_reports(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    requirements = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"),
                                   str(ROOT / "pyproject.toml"), "service", "report"],
                                  check=True, capture_output=True, text=True).stdout
    (tmp_path / "requirements.txt").write_text(requirements)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(tmp_path / "requirements.txt")],
                         capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-4000:]
    run = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
                              "MPLBACKEND": "Agg"}, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-4000:]
