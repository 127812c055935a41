"""The REST API in-process (TestClient) against a real ledger on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.session import session_scope
from api.liveness import write_executor_heartbeat
from api.main import create_app
from sgtm_engine.config import STAGE_NAME_RULE, STAGE_SPECS, StageKind
from tests.ledger_fixtures import TOKEN, RecordingEnqueuer, all_pages

AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_AUTH = {"Authorization": ""}
TINY = {"model": {"n_layer": 2, "d_model": 64, "context": 64}, "steps": 20, "batch_size": 4}


@pytest.fixture
def client(settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    with TestClient(create_app(settings, enqueuer=enqueuer), headers=AUTH) as c:  # reads need a token too
        yield c


def submit(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/api/v1/jobs", json=body, headers={**AUTH, **headers})


def test_health_ready_and_docs(client: TestClient, settings: Settings) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    settings.data_root.mkdir(parents=True, exist_ok=True)
    write_executor_heartbeat(settings.data_root)  # as the embedded executor does (tests/api/test_health.py)
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    assert "/api/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_mutating_routes_need_a_valid_bearer_token(client: TestClient) -> None:
    assert client.post("/api/v1/jobs", json={"kind": "train"}, headers=NO_AUTH).status_code == 401
    bad = client.post("/api/v1/jobs", json={"kind": "train"}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/api/v1/jobs").status_code == 200


def test_submit_returns_202_location_and_rings_the_bell(client: TestClient, enqueuer: RecordingEnqueuer) -> None:
    r = submit(client, {"kind": "train", "spec": TINY})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["method"] == "sgtm"
    assert job["spec"]["model"]["n_layer"] == 2 and job["spec"]["optim"]["lr"] == 1e-3  # canonical, defaults in
    assert enqueuer.sent == [(job["id"], "gpu")]
    cpu = submit(client, {"kind": "train", "spec": {**TINY, "runtime": {"device": "cpu"}}}).json()
    assert cpu["queue"] == "cpu"
    assert client.get(job["links"]["self"]).json()["id"] == job["id"]


@pytest.mark.parametrize(("spec", "loc", "words"), [
    ({"model": {"n_layer": 0}}, ["body", "spec", "model", "n_layer"], ["n_layer=0", ">= 1"]),
    ({"stepz": 3}, ["body", "spec", "stepz"], ["unknown field", "steps"]),
    ({"data": {"corpus": "/etc/passwd"}}, ["body", "spec", "data", "corpus"], ["registry name", "paths"]),
    ({"data": {"corpus": "https://evil.example/x"}}, ["body", "spec", "data", "corpus"], ["URLs"]),
    ({"data": {"corpus": "x; rm -rf /"}}, ["body", "spec", "data", "corpus"], ["commands"]),
    ({"masking": {"forget_mlp_dim": 10_000}}, ["body", "spec", "masking", "forget_mlp_dim"], ["below the MLP"]),
    ({"steps": "many"}, ["body", "spec", "steps"], ["expected an integer"]),
    # names checked at the door, not when the job runs: field, value, did-you-mean and the valid names
    ({"data": {"corpus": "wiki-bilngual"}}, ["body", "spec", "data", "corpus"],
     ["'wiki-bilngual'", "did you mean 'wiki-bilingual'?", "wikipedia-ores"]),
    ({"data": {"corpus": "klingon"}}, ["body", "spec", "data", "corpus"], ["unknown corpus", "wiki-bio"]),
    ({"data": {"tokenizer": "gtp2"}}, ["body", "spec", "data", "tokenizer"], ["'gtp2'", "gpt2"]),
    ({"masking": {"strategy": "sgmt"}}, ["body", "spec", "masking", "strategy"], ["'sgmt'", "did you mean 'sgtm'"]),
])
def test_bad_specs_are_422_naming_the_field(client: TestClient, spec: dict[str, Any], loc: list[str],
                                            words: list[str]) -> None:
    r = submit(client, {"kind": "train", "spec": spec})
    assert r.status_code == 422, r.text
    problems = r.json()["detail"]
    match = [p for p in problems if p["loc"] == loc]
    assert match, problems
    assert all(w in match[0]["msg"] for w in words), match[0]["msg"]


def test_category_names_and_parameter_patterns_pass_the_string_check(client: TestClient) -> None:
    """Spaces, commas, accents and globs are names, not paths: an RMU pattern and a Spanish category name pass."""
    rmu = submit(client, {"kind": "rmu", "inputs": {"model": submit(client, {"kind": "train", "spec": TINY}).json()[
        "id"]}, "spec": {"param_patterns": ["transformer.h.*.mlp.c_fc.weight"]}})
    assert rmu.status_code == 202, rmu.text
    attack = submit(client, {"kind": "attack", "inputs": {"model": rmu.json()["id"]},
                             "spec": {"reference_forget_loss": 5.0, "forget_category": "Geografía, historia"}})
    assert attack.status_code == 202, attack.text
    assert attack.json()["spec"]["forget_category"] == "Geografía, historia"


def test_other_bad_bodies_are_422(client: TestClient) -> None:
    assert submit(client, {"kind": "bake"}).status_code == 422
    assert submit(client, {"kind": "train", "command": "ls"}).status_code == 422  # unknown top-level field
    assert submit(client, {"kind": "train", "gpus": 0}).status_code == 422
    r = submit(client, {"kind": "train", "queue": "cpu", "gpus": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gpus"]
    parent = submit(client, {"kind": "train", "spec": TINY}).json()["id"]
    r = submit(client, {"kind": "ablate", "inputs": {"model": parent}, "gpus": 2})  # every rank would ablate
    assert r.json()["detail"] == [{"type": "value_error", "loc": ["body", "gpus"], "input": 2,
                                   "msg": "gpus=2: an ablate stage runs as one process (train and attack stages split "
                                          "their batches over GPUs); use gpus=1"}]
    r = client.post("/api/v1/jobs", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422
    missing = [k for k in StageKind if k not in STAGE_SPECS]
    if missing:  # a kind the engine has not registered yet is refused by name, not with a 500
        r = submit(client, {"kind": missing[0].value, "inputs": {}})
        assert r.status_code == 422 and "no" in r.json()["detail"][0]["msg"]


def test_a_body_typo_gets_a_did_you_mean_and_no_follow_on_error(client: TestClient) -> None:
    r = submit(client, {"knd": "train", "spec": TINY})
    assert r.status_code == 422
    assert r.json()["detail"] == [{"type": "extra_forbidden", "loc": ["body", "knd"], "input": "train",
                                   "msg": "knd: unknown field of a job; did you mean 'kind'?"}]  # no "kind: required"
    r = submit(client, {"kind": "trian"})
    assert r.json()["detail"][0]["msg"].endswith("did you mean 'train'?")
    r = client.post("/api/v1/sweeps", json={"base": {"stages": [{"name": "t", "kind": "train"}]}, "sedes": [0]})
    assert r.json()["detail"][0]["msg"] == "sedes: unknown field of a sweep; did you mean 'seeds'?"
    r = submit(client, {"kind": "train", "command": "ls"})
    assert "known fields: ['experiment', 'gpus', 'inputs', 'kind', 'queue', 'spec']" in r.text  # nothing close
    r = submit(client, {"kind": "evaluate", "inputs": {"model": "nope"}})  # a name's rule, not its regex
    assert r.json()["detail"][0]["msg"].startswith("inputs.model='nope': expected an id as the API returned it")
    r = client.post("/api/v1/pipelines", json={"stages": [{"name": "Train", "kind": "train"}]})
    assert r.json()["detail"][0]["msg"] == f"stages[0].name='Train': {STAGE_NAME_RULE}"


def test_a_query_typo_gets_a_did_you_mean_and_no_regex(client: TestClient) -> None:
    r = client.get("/api/v1/jobs", params={"status": ["queued", "runing"]})
    assert r.status_code == 422
    assert r.json()["detail"] == [{"type": "enum", "loc": ["query", "status", 1], "input": "runing",
                                   "msg": "status[1]='runing': must be one of ['queued', 'running', 'succeeded', "
                                          "'failed', 'cancelled']; did you mean 'running'?"}]
    r = client.get("/api/v1/jobs", params={"kind": "trian"})
    assert r.json()["detail"][0]["msg"].endswith("did you mean 'train'?")
    r = client.get("/api/v1/jobs", params={"pipeline_id": "xyz"})
    assert r.json()["detail"][0]["msg"] == ("pipeline_id='xyz': expected an id as the API returned it (a UUID: "
                                            "8-4-4-4-12 lowercase hex digits)")
    r = client.get("/api/v1/jobs", params={"statuss": "failed"})  # ignored, it would list every job unfiltered
    assert r.status_code == 422
    assert r.json()["detail"] == [{"type": "value_error", "loc": ["query", "statuss"], "input": "failed",
                                   "msg": "statuss: unknown field of the query of GET /api/v1/jobs; did you mean "
                                          "'status'?"}]
    assert client.get("/health", params={"probe": "1"}).status_code == 200  # probes may add cache-busters
    r = client.get("/api/v1/jobs/00000000-0000-4000-8000-000000000000", params={"verbose": "1"})
    assert r.json()["detail"][0]["msg"] == ("verbose: unknown field of the query of GET /api/v1/jobs/{job_id}; it has "
                                            "none")
    for cursor in ("%%", "Zm9v"):  # not even base64; base64 of something else: the same words
        r = client.get("/api/v1/jobs", params={"cursor": cursor})
        assert r.json()["detail"][0]["msg"] == (f"cursor={cursor!r}: not a cursor this API issued; pass "
                                                "`next_cursor` from the previous page unchanged")


def test_a_huge_number_is_shown_by_its_magnitude(client: TestClient) -> None:
    """JSON `1e308` for an integer field arrives as a 309-digit integer; the 422 names it `1.000e+308`, in its message
    and its echo alike (as any integer of over 16 digits)."""
    r = client.post("/api/v1/jobs", content=b'{"kind": "train", "spec": {"steps": 1e308}}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    [problem] = r.json()["detail"]
    assert problem["msg"].startswith("spec.steps=1.000e+308: above the limit") and problem["input"] == "1.000e+308"
    [problem] = submit(client, {"kind": "train", "spec": {"steps": 10**17}}).json()["detail"]
    assert problem["msg"].startswith("spec.steps=1.000e+17: ") and problem["input"] == "1.000e+17"  # said alike


def test_inputs_are_job_ids_of_model_producing_jobs(client: TestClient, enqueuer: RecordingEnqueuer) -> None:
    r = submit(client, {"kind": "ablate"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "inputs", "model"]
    r = submit(client, {"kind": "ablate", "inputs": {"model": "/data/jobs/x"}})
    assert r.status_code == 422  # not a job id
    r = submit(client, {"kind": "ablate", "inputs": {"model": "00000000-0000-4000-8000-000000000000"}})
    assert r.status_code == 422 and "no such job" in r.json()["detail"][0]["msg"]
    train = submit(client, {"kind": "train", "spec": TINY}).json()
    r = submit(client, {"kind": "ablate", "inputs": {"model": train["id"]}})
    assert r.status_code == 202, r.text
    child = r.json()
    assert child["waiting_on"] == [train["id"]] and child["inputs"] == {"model": train["id"]}
    assert child["method"] == "sgtm"  # inherited from the model it ablates
    assert child["id"] not in enqueuer.job_ids  # rung when its parent succeeds, not before
    r = submit(client, {"kind": "evaluate", "inputs": {"model": child["id"]}})
    assert r.status_code == 202
    r = submit(client, {"kind": "ablate", "inputs": {"model": r.json()["id"]}})
    assert r.status_code == 422 and "produces no model" in r.json()["detail"][0]["msg"]


def test_unknown_jobs_are_404(client: TestClient) -> None:
    for job_id in ("00000000-0000-4000-8000-000000000000", "nope", "%00", "..%2F..%2Fetc"):
        assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404
        assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 404
        assert client.get(f"/api/v1/jobs/{job_id}/events", headers=AUTH).status_code == 404


def test_cancel_queued_then_409_on_finished(client: TestClient, factory: sessionmaker[Session]) -> None:
    job = submit(client, {"kind": "train", "spec": TINY}).json()
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=AUTH).status_code == 202
    done = submit(client, {"kind": "train", "spec": TINY}).json()
    with session_scope(factory) as s:
        repo.claim(s, job_id=done["id"], owner="w")
        repo.mark_succeeded(s, job_id=done["id"], attempt=1, result={"summary": {"x": 1}})
    r = client.post(f"/api/v1/jobs/{done['id']}/cancel", headers=AUTH)
    assert r.status_code == 409 and "succeeded" in r.json()["detail"]


def test_list_filters_and_paginates(client: TestClient) -> None:
    ids = [submit(client, {"kind": "train", "spec": {**TINY, "seed": i}}).json()["id"] for i in range(5)]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=AUTH)
    assert all_pages(client, "/api/v1/jobs") == ids[::-1]
    queued = client.get("/api/v1/jobs", params={"status": "queued"}).json()["items"]
    assert {j["id"] for j in queued} == set(ids[1:])
    assert client.get("/api/v1/jobs", params={"kind": "ablate"}).json()["items"] == []
    assert client.get("/api/v1/jobs", params={"cursor": "Zm9v"}).status_code == 422
    assert client.get("/api/v1/jobs", params={"limit": 0}).status_code == 422


def test_idempotency_key_replays_and_conflicts(client: TestClient, enqueuer: RecordingEnqueuer) -> None:
    first = submit(client, {"kind": "train", "spec": TINY}, **{"Idempotency-Key": "k-1"})
    again = submit(client, {"kind": "train", "spec": TINY}, **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = submit(client, {"kind": "train", "spec": {**TINY, "seed": 9}}, **{"Idempotency-Key": "k-1"})
    assert other.status_code == 409
    assert enqueuer.job_ids == [first.json()["id"]]
    assert submit(client, {"kind": "train"}, **{"Idempotency-Key": "bad key/with slash"}).status_code == 422


def test_concurrent_submissions_with_one_key_create_one_job(client: TestClient, enqueuer: RecordingEnqueuer
                                                            ) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda _: submit(client, {"kind": "train", "spec": TINY},
                                                   **{"Idempotency-Key": "burst"}), range(20)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(client.get("/api/v1/jobs").json()["items"]) == 1
    assert len(enqueuer.sent) == 1


def test_a_broker_outage_still_records_the_job(client: TestClient, enqueuer: RecordingEnqueuer,
                                               factory: sessionmaker[Session]) -> None:
    enqueuer.fail = True
    r = submit(client, {"kind": "train", "spec": TINY})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    with factory() as s:
        job = repo.get(s, job_id=r.json()["id"])
        assert job is not None and job.enqueued_at is None  # marked unsent: the reaper sends it soon


def test_a_child_of_a_finished_parent_is_sent_at_once(client: TestClient, enqueuer: RecordingEnqueuer,
                                                      factory: sessionmaker[Session]) -> None:
    parent = submit(client, {"kind": "train", "spec": TINY}).json()
    with session_scope(factory) as s:
        repo.claim(s, job_id=parent["id"], owner="w")
        repo.mark_succeeded(s, job_id=parent["id"], attempt=1, result={})
    child = submit(client, {"kind": "evaluate", "inputs": {"model": parent["id"]}}).json()
    assert child["waiting_on"] == [] and enqueuer.job_ids == [parent["id"], child["id"]]


PIPELINE = {"name": "chain", "stages": [
    {"name": "train", "kind": "train", "spec": TINY},
    {"name": "ablate", "kind": "ablate", "inputs": {"model": "train"}},
    {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "ablate"}, "spec": {"ablate": None}},
]}


def test_pipeline_creates_a_chain_and_rings_only_its_roots(client: TestClient, enqueuer: RecordingEnqueuer) -> None:
    r = client.post("/api/v1/pipelines", json=PIPELINE, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["Location"] == f"/api/v1/pipelines/{body['id']}"
    train, ablate, evaluate = body["jobs"]
    assert [j["stage_name"] for j in body["jobs"]] == ["train", "ablate", "evaluate"]
    assert ablate["inputs"] == {"model": train["id"]} and evaluate["inputs"] == {"model": ablate["id"]}
    assert enqueuer.job_ids == [train["id"]] and body["status"] == "queued"
    assert client.get(f"/api/v1/pipelines/{body['id']}").json()["jobs"][2]["id"] == evaluate["id"]
    listed = client.get("/api/v1/jobs", params={"pipeline_id": body["id"]}).json()["items"]
    assert len(listed) == 3
    cancelled = client.post(f"/api/v1/pipelines/{body['id']}/cancel", headers=AUTH).json()
    assert {j["status"] for j in cancelled["jobs"]} == {"cancelled"} and cancelled["status"] == "cancelled"


def test_bad_pipelines_are_422_naming_the_stage(client: TestClient) -> None:
    stages = [dict(s) for s in PIPELINE["stages"]]  # type: ignore[attr-defined]
    backwards = {"stages": [stages[1], stages[0]]}
    r = client.post("/api/v1/pipelines", json=backwards, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "stages", 0, "inputs", "model"]
    dupes = {"stages": [stages[0], stages[0]]}
    r = client.post("/api/v1/pipelines", json=dupes, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "stages", 1, "name"]
    bad_spec = {"stages": [{**stages[0], "spec": {"model": {"n_layer": -1}}}]}
    r = client.post("/api/v1/pipelines", json=bad_spec, headers=AUTH)
    assert r.json()["detail"][0]["loc"] == ["body", "stages", 0, "spec", "model", "n_layer"]
    assert client.post("/api/v1/pipelines", json={"stages": []}, headers=AUTH).status_code == 422
    assert client.get("/api/v1/pipelines/nope").status_code == 404


def test_events_stream_as_sse_with_ids_and_a_done_event(client: TestClient, factory: sessionmaker[Session]) -> None:
    job = submit(client, {"kind": "train", "spec": TINY}).json()
    with session_scope(factory) as s:
        repo.claim(s, job_id=job["id"], owner="w")
        repo.record_progress(s, job_id=job["id"], attempt=1, step=5, total=20, metrics={"train/loss": 2.0},
                             events=[{"type": "progress", "step": 5, "total": 20}])
        repo.mark_succeeded(s, job_id=job["id"], attempt=1, result={"summary": {}})
    events = _read_sse(client, f"/api/v1/jobs/{job['id']}/events")
    assert [e["event"] for e in events] == ["status", "status", "progress", "status", "done"]
    assert json.loads(events[2]["data"])["step"] == 5
    assert json.loads(events[-1]["data"])["status"] == "succeeded"
    resumed = _read_sse(client, f"/api/v1/jobs/{job['id']}/events", {"Last-Event-ID": events[2]["id"]})
    assert [e["event"] for e in resumed] == ["status", "done"]


def _read_sse(client: TestClient, url: str, headers: dict[str, str] | None = None) -> list[dict[str, str]]:
    with client.stream("GET", url, headers={**AUTH, **(headers or {})}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        return _parse_sse("".join(r.iter_text()))


def _parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if fields:
            events.append(fields)
    return events


def test_an_attack_takes_a_model_and_an_optional_baseline(client: TestClient) -> None:
    sweep = {"name": "attack-chain", "stages": [
        {"name": "baseline", "kind": "train", "spec": {**TINY, "masking": {"strategy": "none"}}},
        {"name": "sgtm", "kind": "train", "spec": TINY},
        {"name": "attack", "kind": "attack", "inputs": {"model": "sgtm", "baseline": "baseline"},
         "spec": {"steps": 5, "eval_every": 5}},
        {"name": "attack-no-ref", "kind": "attack", "inputs": {"model": "sgtm"}, "spec": {"steps": 5}},
    ]}
    r = client.post("/api/v1/pipelines", json=sweep, headers=AUTH)
    assert r.status_code == 202, r.text
    jobs = {j["stage_name"]: j for j in r.json()["jobs"]}
    assert jobs["attack"]["inputs"] == {"model": jobs["sgtm"]["id"], "baseline": jobs["baseline"]["id"]}
    assert jobs["baseline"]["method"] == "no_filter" and jobs["attack"]["method"] == "sgtm"
    bad = {"stages": [sweep["stages"][1], {"name": "attack", "kind": "attack",  # type: ignore[index]
                                           "inputs": {"model": "sgtm", "victim": "sgtm"}}]}
    r = client.post("/api/v1/pipelines", json=bad, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "stages", 1, "inputs", "victim"]


def test_ready_reports_an_unmigrated_database(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'empty.db'}", api_tokens=[TOKEN],
                        data_root=tmp_path)
    with TestClient(create_app(settings)) as c:
        r = c.get("/ready")
    assert r.status_code == 503 and "alembic upgrade head" in r.json()["checks"]["schema"]


def test_every_spec_field_is_documented_in_the_openapi_from_the_dataclasses(client: TestClient) -> None:
    """A stage spec in the OpenAPI is one of the engine's spec classes, each field with its type, default and the
    attribute docstring the dataclass gives it (not an opaque object)."""
    from sgtm_engine.config import STAGE_SPECS

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for body in ("JobCreate", "StageCreate"):
        spec = schemas[body]["properties"]["spec"]
        variants = {v["title"].split(" ")[0]: v for v in spec["anyOf"]}
        assert set(variants) == {cls.__name__ for cls in STAGE_SPECS.values()}
        train = variants["TrainSpec"]["properties"]
        assert train["steps"] == {"default": 1000, "description": "Optimizer steps.", "title": "Steps",
                                  "type": "integer"}
        model = train["model"]["properties"]
        assert model["n_layer"]["description"] == "Transformer blocks." and model["n_layer"]["type"] == "integer"
        assert train["model"]["additionalProperties"] is False  # unknown fields are refused, as the engine does
        assert "$ref" not in str(spec)
