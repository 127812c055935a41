"""Sweeps through the real service: the deployed stack (PostgreSQL, Redis, a Celery worker, the MLflow server) and
`sgtm serve` (SQLite, local executor, local MLflow store).

Cells are tiny (tiny_train with a few steps, evaluate without calibration); a failure is injected with a learning rate
that passes validation and makes training diverge, so the cell fails at run time (an unknown corpus is refused at
the door).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.checks import ledger_rows, wait_for
from tests.integration.conftest import FAST_EVALUATE, Embedded, Stack, tiny_train

pytestmark = pytest.mark.integration

TERMINAL = {"succeeded", "failed", "cancelled"}


#: A learning rate that passes validation and makes training diverge: the cell fails when it runs, not at the door.
DIVERGES = 1.0e6


def sweep_body(name: str, *, steps: int, lrs: list[float], seeds: list[int]) -> dict[str, Any]:
    return {"kind": "sweep", "name": name, "base": {"stages": [
        {"name": "train", "kind": "train", "spec": tiny_train(steps=steps, optim={"lr": 3.0e-3, "warmup_steps": 0})},
        {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "train"}, "spec": FAST_EVALUATE},
    ]}, "grid": {"train.optim.lr": lrs}, "seeds": seeds}


def wait_for_sweep(client: httpx.Client, sweep_id: str, timeout: float, logs: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    sweep: dict[str, Any] = {}
    while time.monotonic() < deadline:
        sweep = client.get(f"/api/v1/sweeps/{sweep_id}").json()
        if sweep["status"] in TERMINAL:
            return sweep
        time.sleep(1.0)
    raise AssertionError(f"sweep not finished after {timeout:.0f}s: {sweep.get('counts')}\n{logs() if logs else ''}")


def jobs_per_cell(ledger_url: str, cell_ids: list[str]) -> dict[str, int]:
    rows = ledger_rows(ledger_url, "SELECT p.cell_id AS cell_id, count(j.id) AS n FROM pipelines p "
                                   "JOIN jobs j ON j.pipeline_id = p.id GROUP BY p.cell_id")
    return {r["cell_id"]: int(r["n"]) for r in rows if r["cell_id"] in cell_ids}


def test_resubmitting_after_a_partial_failure_reruns_only_the_failed_cells(stack: Stack) -> None:
    body = sweep_body("dedupe", steps=6, lrs=[3.0e-3, DIVERGES], seeds=[0])  # a cell that succeeds, one that fails
    with stack.client() as client:
        r = client.post("/api/v1/sweeps", json=body, headers={"Idempotency-Key": "dedupe-1"})
        assert r.status_code == 202, r.text
        first = wait_for_sweep(client, r.json()["id"], 420, stack.logs)
        assert first["counts"] == {"succeeded": 1, "failed": 1}, first
        ok = [c for c in first["cells"] if c["status"] == "succeeded"]
        bad = [c for c in first["cells"] if c["status"] == "failed"]
        assert {c["params"]["train.optim.lr"] for c in bad} == {DIVERGES}
        assert all(c["error"]["type"] == "training_diverged" for c in bad), bad
        cell_ids = [c["cell_id"] for c in first["cells"]]
        before = jobs_per_cell(stack.ledger_url, cell_ids)

        r = client.post("/api/v1/sweeps", json=body)  # a new submission of the same sweep (no key)
        assert r.status_code == 202, r.text
        second = r.json()
        by_cell = {c["cell_id"]: c for c in second["cells"]}
        for cell in ok:  # never rerun a cell that succeeded
            assert by_cell[cell["cell_id"]]["pipeline_id"] == cell["pipeline_id"]
            assert by_cell[cell["cell_id"]]["reused"] and by_cell[cell["cell_id"]]["jobs"] == cell["jobs"]
        for cell in bad:  # never skip one that failed: a fresh pipeline each
            assert by_cell[cell["cell_id"]]["pipeline_id"] != cell["pipeline_id"]
        second = wait_for_sweep(client, second["id"], 300, stack.logs)
        after = jobs_per_cell(stack.ledger_url, cell_ids)
        for cell in ok:
            assert after[cell["cell_id"]] == before[cell["cell_id"]], "a succeeded cell ran again"
        for cell in bad:
            assert after[cell["cell_id"]] == 2 * before[cell["cell_id"]], "a failed cell was not rerun"
        assert second["counts"] == {"succeeded": 1, "failed": 1}

        # MLflow: the first sweep's parent run carries the report; cell pipeline runs nest under it.
        first = client.get(f"/api/v1/sweeps/{first['id']}").json()
        _check_mlflow(stack.mlflow_uri, first, client)


def _check_mlflow(mlflow_uri: str, sweep: dict[str, Any], client: httpx.Client) -> None:
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    run_id = wait_for(lambda: client.get(f"/api/v1/sweeps/{sweep['id']}").json().get("mlflow"), 30,
                      "sweep parent run recorded")["run_id"]
    parent = wait_for(lambda: (lambda run: run if run.info.status != "RUNNING" else None)(mlflow.get_run(run_id)),
                      60, "sweep run closed")
    assert parent.info.status == "FAILED" and parent.data.tags["sgtm.sweep_id"] == sweep["id"]
    artifacts = {a.path for a in mlflow.list_artifacts(run_id, "report")}
    assert {"report/report.md", "report/report.json"} <= artifacts, artifacts
    assert any(p.endswith(".png") for p in artifacts), artifacts
    assert parent.data.metrics["sweep/n_succeeded"] == 1.0
    for cell in sweep["cells"]:
        pipeline = client.get(f"/api/v1/pipelines/{cell['pipeline_id']}").json()
        tags = mlflow.get_run(pipeline["mlflow"]["run_id"]).data.tags
        assert tags["mlflow.parentRunId"] == run_id
        assert (tags["sgtm.sweep_id"], tags["sgtm.cell_id"], tags["sgtm.seed"]) == (sweep["id"], cell["cell_id"],
                                                                               str(cell["seed"]))
        assert float(tags["sgtm.param.train.optim.lr"]) == cell["params"]["train.optim.lr"]


def test_cancel_cancels_the_whole_sweep(stack: Stack) -> None:
    body = sweep_body("cancel", steps=3000, lrs=[3.0e-3], seeds=[0, 1, 2])
    with stack.client() as client:
        sweep = client.post("/api/v1/sweeps", json=body).json()
        wait_for(lambda: client.get(f"/api/v1/sweeps/{sweep['id']}").json()["counts"].get("running"), 120,
                 "a cell running", stack.logs)
        r = client.post(f"/api/v1/sweeps/{sweep['id']}/cancel")
        assert r.status_code == 202, r.text
        done = wait_for_sweep(client, sweep["id"], 60, stack.logs)
        assert done["counts"] == {"cancelled": 3}, done
        for cell in done["cells"]:
            for job_id in cell["jobs"].values():
                assert client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_sweep_cli_wait_and_report_in_embedded_mode(embedded: Embedded, tmp_path: Path) -> None:
    """Two seeds x two evaluation sizes: the cells of a seed share its train stage, which runs once, in the first
    cell's pipeline; the other cell's evaluate reads it from there."""
    recipe = tmp_path / "sweep.yaml"
    body = sweep_body("cli", steps=6, lrs=[3.0e-3], seeds=[0, 1])
    body["grid"] = {"evaluate.eval.max_batches": [1, 2]}
    recipe.write_text(yaml.safe_dump(body))
    cli = [sys.executable, "-m", "api.client_cli"]
    common = ["--url", embedded.api_url, "--data-root", str(embedded.data_root)]
    done = subprocess.run([*cli, "sweep", str(recipe), "--set", "train.steps=7", "--wait", *common],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = " ".join(done.stdout.split())  # rich wraps lines at the terminal width
    assert "4 cells" in printed and "4 succeeded" in printed
    sweep_id = printed.split("submitted sweep ", 1)[1].split(":", 1)[0]
    listed = subprocess.run([*cli, "sweeps", *common], capture_output=True, text=True, timeout=60,
                            env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
    assert sweep_id in listed.stdout, listed.stdout + listed.stderr
    out = tmp_path / "report"
    reported = subprocess.run([*cli, "report", sweep_id, "--out", str(out), *common], capture_output=True,
                              text=True, timeout=120)
    assert reported.returncode == 0, reported.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["n_cells"] == 4 and report["n_succeeded"] == 4
    row = report["tables"][0]["rows"][0]
    assert row["stats"]["eval/retain/loss"]["n"] == 2 and row["stats"]["eval/retain/loss"]["std"] is not None
    assert "mean ± sample std" in (out / "report.md").read_text()
    assert list(out.glob("*.png"))
    with embedded.client() as client:
        cells = client.get(f"/api/v1/sweeps/{sweep_id}").json()["cells"]
        trains = {c["seed"]: c["jobs"]["train"] for c in cells}
        assert all(c["jobs"]["train"] == trains[c["seed"]] for c in cells) and len(set(trains.values())) == 2
        assert client.get(f"/api/v1/jobs/{trains[0]}").json()["progress"]["total"] == 7  # --set reached the base
        for cell in cells:  # each cell's evaluate ran on its seed's model
            evaluate = client.get(f"/api/v1/jobs/{cell['jobs']['evaluate']}").json()
            assert evaluate["status"] == "succeeded" and evaluate["inputs"] == {"model": trains[cell["seed"]]}
    again = subprocess.run([*cli, "sweep", str(recipe), "--set", "train.steps=7", *common], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "4 reused" in " ".join(again.stdout.split()), again.stdout
