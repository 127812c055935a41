"""A train → ablate → evaluate pipeline on a tiny model, submitted over REST, in both modes: the deployed stack
(PostgreSQL, Redis, Celery, MLflow server) and `sgtm serve` (SQLite, local executor, local MLflow store)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.checks import check_pipeline_agrees, wait_for_jobs
from tests.integration.conftest import Embedded, Stack, chain_pipeline, tiny_train

pytestmark = pytest.mark.integration


def test_pipeline_succeeds_and_ledger_result_and_mlflow_agree(stack: Stack) -> None:
    with stack.client() as client:
        r = client.post("/api/v1/pipelines", json=chain_pipeline("chain-deployed"))
        assert r.status_code == 202, r.text
        pipeline = r.json()
        wait_for_jobs(client, [j["id"] for j in pipeline["jobs"]], timeout=420, logs=stack.logs)
        check_pipeline_agrees(client=client, pipeline_id=pipeline["id"], ledger_url=stack.ledger_url,
                              mlflow_uri=stack.mlflow_uri, data_root=stack.data_root)


def test_pipeline_succeeds_in_embedded_mode(embedded: Embedded) -> None:
    with embedded.client() as client:
        r = client.post("/api/v1/pipelines", json=chain_pipeline("chain-embedded"))
        assert r.status_code == 202, r.text
        pipeline = r.json()
        wait_for_jobs(client, [j["id"] for j in pipeline["jobs"]], timeout=420, logs=embedded.process.log_tail)
        check_pipeline_agrees(client=client, pipeline_id=pipeline["id"], ledger_url=embedded.ledger_url,
                              mlflow_uri=embedded.mlflow_uri, data_root=embedded.data_root)


def test_cli_submit_watch_and_sse_in_embedded_mode(embedded: Embedded, tmp_path: Path) -> None:
    """`sgtm submit RECIPE --watch` exits 0 when the job succeeds; the job's server-sent events stream its
    progress live and end with `done`; `sgtm jobs` lists it; cancelling a finished job is refused (exit 2)."""
    recipe = tmp_path / "one.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "train", "spec": tiny_train(steps=10)}))
    cli = [sys.executable, "-m", "api.client_cli"]
    common = ["--url", embedded.api_url, "--data-root", str(embedded.data_root)]
    submitted = subprocess.run([*cli, "submit", str(recipe), "--set", "steps=15", *common], capture_output=True,
                               text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().rsplit("=", 1)[1]
    with embedded.client() as client, client.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=300) as r:
        kinds = [line.split(":", 1)[1].strip() for line in r.iter_lines() if line.startswith("event:")]
    assert kinds[0] == "status" and kinds[-1] == "done" and "progress" in kinds and "checkpoint" in kinds
    watched = subprocess.run([*cli, "watch", job_id, *common], capture_output=True, text=True, timeout=300)
    assert watched.returncode == 0, watched.stderr
    listed = subprocess.run([*cli, "jobs", "--status", "succeeded", *common], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert job_id in listed.stdout
    refused = subprocess.run([*cli, "cancel", job_id, *common], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "409" in refused.stderr
    with embedded.client() as client:
        assert client.get(f"/api/v1/jobs/{job_id}").json()["progress"]["total"] == 15  # the --set override


def test_a_live_mlflow_server_passes_the_reachability_check_and_takes_a_local_run(stack: Stack, tmp_path: Path) -> None:
    """`sgtm run`/`sgtm sweep --local` probe an http(s) store before they start: the deployed MLflow server answers
    the probe, and the run it lets through is logged there."""
    from mlflow.tracking import MlflowClient

    from sgtm_engine.runner import parent_run
    from sgtm_engine.tracking import check_server

    check_server(stack.mlflow_uri)
    run = parent_run(tmp_path, stack.mlflow_uri, "reachability", "probe", tags={})
    run.close("FINISHED")
    assert MlflowClient(stack.mlflow_uri).get_run(run.run_id).info.status == "FINISHED"
