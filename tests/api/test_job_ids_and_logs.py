"""Short id prefixes resolve everywhere a job, pipeline or sweep is named in a URL, and a job's engine log is
readable through the API (token required)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.models import Job
from api.schemas import is_uuid
from tests.api.test_routes import AUTH, TINY


def _job_with_id(factory: sessionmaker[Session], job_id: str) -> None:
    with factory() as session:
        repo.create(session, kind="train", spec={}, spec_hash="h", method="sgtm", seed=0, experiment="e",
                    queue="cpu", gpus=0, max_attempts=1, inputs={}, job_id=job_id)
        session.commit()


def test_a_unique_prefix_of_eight_or_more_hex_characters_names_a_job(client: TestClient) -> None:
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}, headers=AUTH).json()
    for prefix in (job["id"][:8], job["id"][:13], job["id"][:8].upper(), job["id"]):
        r = client.get(f"/api/v1/jobs/{prefix}", headers=AUTH)
        assert r.status_code == 200 and r.json()["id"] == job["id"], (prefix, r.text)
    cancelled = client.post(f"/api/v1/jobs/{job['id'][:10]}/cancel", headers=AUTH)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    for unknown in (job["id"][:7], "ffffffff" if not job["id"].startswith("ffffffff") else "00000000",
                    "not-an-id", "../../etc"):
        assert client.get(f"/api/v1/jobs/{unknown}", headers=AUTH).status_code == 404, unknown


def test_a_whole_id_is_a_uuid_with_nothing_after_it() -> None:
    job_id = "abcdef01-0000-4000-8000-000000000001"
    assert is_uuid(job_id)
    for other in (job_id + "\n", job_id.upper(), job_id[:-1], " " + job_id):  # `$` alone lets a final newline pass
        assert not is_uuid(other), other


def test_an_ambiguous_prefix_is_422_naming_the_matching_ids(client: TestClient,
                                                            factory: sessionmaker[Session]) -> None:
    ids = ["abcdef01-0000-4000-8000-000000000001", "abcdef01-0000-4000-8000-000000000002"]
    for job_id in ids:
        _job_with_id(factory, job_id)
    r = client.get("/api/v1/jobs/abcdef01", headers=AUTH)
    assert r.status_code == 422, r.text
    problem = r.json()["detail"][0]
    assert problem["loc"] == ["path", "job_id"] and all(i in problem["msg"] for i in ids)
    assert "more of the id" in problem["msg"]
    assert client.get("/api/v1/jobs/abcdef01-0000-4000-8000-0000000000", headers=AUTH).status_code == 422
    assert client.get("/api/v1/jobs/abcdef01-0000-4000-8000-000000000002", headers=AUTH).json()["id"] == ids[1]


def test_pipeline_and_sweep_prefixes_resolve(client: TestClient) -> None:
    body = {"stages": [{"name": "train", "kind": "train", "spec": TINY}]}
    pipeline = client.post("/api/v1/pipelines", json=body, headers=AUTH).json()
    assert client.get(f"/api/v1/pipelines/{pipeline['id'][:8]}", headers=AUTH).json()["id"] == pipeline["id"]
    assert client.post(f"/api/v1/pipelines/{pipeline['id'][:8]}/cancel", headers=AUTH).status_code == 202


def test_the_engine_log_of_an_attempt_needs_a_token_and_comes_from_its_end(
        client: TestClient, settings: Settings, factory: sessionmaker[Session]) -> None:
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}, headers=AUTH).json()
    r = client.get(f"/api/v1/jobs/{job['id']}/logs", headers=AUTH)
    assert r.status_code == 404 and "not started" in r.json()["detail"]
    with factory() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(attempt=2))
        session.commit()
    logs = settings.workdir(job["id"]) / "logs"
    logs.mkdir(parents=True)
    (logs / "attempt-1.log").write_text("first attempt\n")
    (logs / "attempt-2.log").write_text("".join(f"line {i}\n" for i in range(10_000)))
    assert client.get(f"/api/v1/jobs/{job['id']}/logs", headers={"Authorization": ""}).status_code == 401
    latest = client.get(f"/api/v1/jobs/{job['id'][:8]}/logs", params={"tail": 16}, headers=AUTH)
    assert latest.status_code == 200 and latest.text == " 9998\nline 9999\n"
    assert latest.headers["X-Log-Attempt"] == "2" and int(latest.headers["X-Log-Size"]) > 16
    assert latest.headers["content-type"].startswith("text/plain")
    first = client.get(f"/api/v1/jobs/{job['id']}/logs", params={"attempt": 1}, headers=AUTH)
    assert first.text == "first attempt\n"
    missing = client.get(f"/api/v1/jobs/{job['id']}/logs", params={"attempt": 3}, headers=AUTH)
    assert missing.status_code == 404 and "attempts so far: 2" in missing.json()["detail"]


def test_a_prefix_names_the_job_whose_events_are_streamed(client: TestClient) -> None:
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}, headers=AUTH).json()
    client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=AUTH)  # finished: the stream ends with `done`
    with client.stream("GET", f"/api/v1/jobs/{job['id'][:8]}/events", headers=AUTH) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    assert "event: done" in lines and any(line.startswith("data: ") and job["id"] in line for line in lines)
