"""/api/v1/sweeps in-process (TestClient) against a real ledger on SQLite and PostgreSQL: submission, dedupe by cell
id across resubmissions (succeeded reused, running attached, failed/cancelled rerun), cancel, resume, 422s, report.

Job outcomes are written with the ledger's own repository functions (claim, mark_*), as a supervisor would."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.db import jobs as repo
from api.db.models import Pipeline
from api.db.session import session_scope
from tests.ledger_fixtures import TOKEN, RecordingEnqueuer, all_pages

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {"model": {"n_layer": 2, "d_model": 64, "context": 64}, "steps": 5, "runtime": {"device": "cpu"}}


def sweep_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "sweep", "name": "unit",
        "base": {"stages": [
            {"name": "train", "kind": "train", "spec": copy.deepcopy(TINY)},
            {"name": "ablate", "kind": "ablate", "inputs": {"model": "train"}},
            {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "ablate"}},
        ]},
        "variants": {"sgtm": {"train.masking.strategy": "sgtm"},
                     "recall_filter": {"train.masking.strategy": "none", "train.filter.kind": "weak",
                                       "ablate": None, "evaluate.inputs.model": "train"}},
        "grid": {"train.noise.recall": [1.0, 0.5]},
        "seeds": [0, 1],
    }
    body.update(extra)
    return body


def post(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/api/v1/sweeps", json=body, headers={**AUTH, **headers})


def finish(factory: sessionmaker[Session], job_id: str, status: str, result: dict[str, Any] | None = None) -> None:
    """Drive a job the way a supervisor does: claim, then a final state."""
    with session_scope(factory) as session:
        attempt = repo.claim(session, job_id=job_id, owner="test")
        assert attempt is not None, job_id
        if status == "succeeded":
            repo.mark_succeeded(session, job_id=job_id, attempt=attempt, result=result or {"metrics": {}})
        elif status == "failed":
            repo.mark_failed(session, job_id=job_id, attempt=attempt, error_type="data_error", error_message="boom")
            repo.settle_orphans(session)


def run_cell(factory: sessionmaker[Session], cell: dict[str, Any], status: str = "succeeded") -> None:
    for stage in cell["jobs"].values():
        finish(factory, stage, status)
        if status != "succeeded":
            return  # the descendants are settled as failed


def n_pipelines(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        return int(session.scalar(select(func.count()).select_from(Pipeline)) or 0)


def test_submit_expands_cells_and_rings_only_ready_jobs(client: TestClient, enqueuer: RecordingEnqueuer) -> None:
    r = post(client, sweep_body())
    assert r.status_code == 202, r.text
    sweep = r.json()
    assert r.headers["Location"] == f"/api/v1/sweeps/{sweep['id']}"
    assert sweep["status"] == "queued" and sweep["counts"] == {"queued": 8} and len(sweep["cells"]) == 8
    cells = sweep["cells"]
    assert [c["position"] for c in cells] == list(range(8))
    assert (cells[0]["variant"], cells[0]["params"], cells[0]["seed"]) == ("sgtm", {"train.noise.recall": 1.0}, 0)
    assert set(cells[0]["jobs"]) == {"train", "ablate", "evaluate"} and set(cells[-1]["jobs"]) == {"train", "evaluate"}
    assert not any(c["reused"] for c in cells)
    trains = {c["jobs"]["train"] for c in cells}
    assert set(enqueuer.job_ids) == trains and all(q == "cpu" for _, q in enqueuer.sent)  # only parentless jobs
    job = client.get(f"/api/v1/jobs/{cells[-1]['jobs']['train']}").json()
    assert job["method"] == "weak_filter" and job["seed"] == 1 and job["spec"]["noise"]["recall"] == 0.5
    assert job["spec"]["noise"]["seed"] == 1
    assert client.get(f"/api/v1/sweeps/{sweep['id']}").json()["cells"] == cells
    listed = client.get("/api/v1/sweeps").json()["items"]
    assert listed[0]["id"] == sweep["id"] and listed[0]["counts"] == {"queued": 8}


def test_idempotency_key_replays_and_refuses_another_body(client: TestClient) -> None:
    first = post(client, sweep_body(), **{"Idempotency-Key": "sweep-1"})
    again = post(client, sweep_body(), **{"Idempotency-Key": "sweep-1"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = post(client, sweep_body(seeds=[7]), **{"Idempotency-Key": "sweep-1"})
    assert other.status_code == 409


def test_resubmit_after_partial_failure_reruns_only_the_failed_cells(
        client: TestClient, factory: sessionmaker[Session], enqueuer: RecordingEnqueuer) -> None:
    first = post(client, sweep_body()).json()
    cells = first["cells"]
    for cell in cells[:4]:
        run_cell(factory, cell, "succeeded")
    run_cell(factory, cells[4], "failed")
    finish(factory, cells[5]["jobs"]["train"], "succeeded")  # cell 5 is still running (its later stages queued)
    with session_scope(factory) as session:
        assert repo.claim(session, job_id=cells[6]["jobs"]["train"], owner="test")  # running
    client.post(f"/api/v1/jobs/{cells[7]['jobs']['train']}/cancel", headers=AUTH)
    assert client.get(f"/api/v1/sweeps/{first['id']}").json()["counts"] == {
        "succeeded": 4, "failed": 1, "queued": 1, "running": 1, "cancelled": 1}
    before, sent = n_pipelines(factory), len(enqueuer.sent)

    second = post(client, sweep_body()).json()
    assert second["id"] != first["id"]
    by_pos = {c["position"]: c for c in second["cells"]}
    for i in (0, 1, 2, 3, 5, 6):  # succeeded: reused; still active: attached, not duplicated
        assert by_pos[i]["pipeline_id"] == cells[i]["pipeline_id"] and by_pos[i]["reused"], i
    for i in (4, 7):  # failed and cancelled: a fresh pipeline each, and only those
        assert by_pos[i]["pipeline_id"] != cells[i]["pipeline_id"] and not by_pos[i]["reused"], i
        assert by_pos[i]["status"] == "queued" and by_pos[i]["cell_id"] == cells[i]["cell_id"]
    assert n_pipelines(factory) == before + 2
    assert sorted(enqueuer.job_ids[sent:]) == sorted(by_pos[i]["jobs"]["train"] for i in (4, 7))
    assert second["counts"] == {"succeeded": 4, "queued": 3, "running": 1}

    # A third submission while the reruns are queued attaches to them: nothing new is created.
    third = post(client, sweep_body()).json()
    assert n_pipelines(factory) == before + 2
    assert [c["pipeline_id"] for c in third["cells"]] == [c["pipeline_id"] for c in second["cells"]]


def test_a_sweep_sharing_some_cells_reuses_exactly_those(client: TestClient, factory: sessionmaker[Session]) -> None:
    first = post(client, sweep_body(variants=None, grid={"train.noise.recall": [1.0, 0.5]}, seeds=[0])).json()
    for cell in first["cells"]:
        run_cell(factory, cell)
    wider = post(client, sweep_body(variants=None, grid={"train.noise.recall": [1.0, 0.5, 0.2]},
                                    seeds=[0], name="wider")).json()
    assert [c["reused"] for c in wider["cells"]] == [True, True, False]
    assert wider["counts"] == {"succeeded": 2, "queued": 1}


def test_cancelling_one_sweep_leaves_running_the_cells_another_sweep_shares(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    """A later sweep attached to a running cell: cancelling the first sweep stops only its own cells; the shared
    pipeline stops when the second sweep is cancelled too; a resume makes a sweep count again."""
    first = post(client, sweep_body(variants=None, grid={"train.noise.recall": [1.0, 0.5]}, seeds=[0])).json()
    shared_train = first["cells"][0]["jobs"]["train"]
    with session_scope(factory) as session:
        assert repo.claim(session, job_id=shared_train, owner="test")
    second = post(client, sweep_body(variants=None, grid={"train.noise.recall": [1.0, 0.2]}, seeds=[0],
                                     name="second")).json()
    shared = first["cells"][0]["pipeline_id"]
    assert second["cells"][0]["pipeline_id"] == shared and second["cells"][0]["reused"]

    after = client.post(f"/api/v1/sweeps/{first['id']}/cancel", headers=AUTH).json()
    assert after["cancelled_at"] is not None
    assert [c["status"] for c in after["cells"]] == ["running", "cancelled"]
    assert client.get(f"/api/v1/jobs/{shared_train}").json()["cancel_requested_at"] is None
    assert client.get(f"/api/v1/sweeps/{second['id']}").json()["counts"] == {"running": 1, "queued": 1}

    # the first sweep resumed counts again: cancelling the second now leaves the shared cell running
    resumed = client.post(f"/api/v1/sweeps/{first['id']}/resume", headers=AUTH).json()
    assert resumed["cancelled_at"] is None
    client.post(f"/api/v1/sweeps/{second['id']}/cancel", headers=AUTH)
    assert client.get(f"/api/v1/jobs/{shared_train}").json()["cancel_requested_at"] is None
    # once every sweep using it is cancelled, it stops
    client.post(f"/api/v1/sweeps/{first['id']}/cancel", headers=AUTH)
    assert client.get(f"/api/v1/jobs/{shared_train}").json()["cancel_requested_at"] is not None


def test_cancel_cancels_every_cell_and_resume_reruns_only_those(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    sweep = post(client, sweep_body()).json()
    cells = sweep["cells"]
    run_cell(factory, cells[0])
    with session_scope(factory) as session:
        assert repo.claim(session, job_id=cells[1]["jobs"]["train"], owner="test")
    r = client.post(f"/api/v1/sweeps/{sweep['id']}/cancel", headers=AUTH)
    assert r.status_code == 202, r.text
    after = r.json()
    # the running job is asked to stop (its supervisor does it); every queued job is cancelled at once
    assert after["counts"] == {"succeeded": 1, "running": 1, "cancelled": 6}
    running = client.get(f"/api/v1/jobs/{cells[1]['jobs']['train']}").json()
    assert running["cancel_requested_at"] is not None
    with session_scope(factory) as session:
        job = repo.get(session, job_id=cells[1]["jobs"]["train"])
        assert job is not None
        repo.mark_cancelled(session, job_id=job.id, attempt=job.attempt)
        repo.settle_orphans(session)
    assert client.get(f"/api/v1/sweeps/{sweep['id']}").json()["counts"] == {"succeeded": 1, "cancelled": 7}
    assert client.post(f"/api/v1/sweeps/{sweep['id']}/cancel", headers={"Authorization": ""}).status_code == 401

    resumed = client.post(f"/api/v1/sweeps/{sweep['id']}/resume", headers=AUTH).json()
    assert resumed["id"] == sweep["id"] and resumed["counts"] == {"succeeded": 1, "queued": 7}
    assert resumed["cells"][0]["pipeline_id"] == cells[0]["pipeline_id"]
    assert all(c["pipeline_id"] != old["pipeline_id"] for c, old in zip(resumed["cells"][1:], cells[1:], strict=True))
    new_filter = resumed["cells"][-1]
    assert set(new_filter["jobs"]) == {"train", "evaluate"}  # the cell's own shape, rebuilt from its jobs
    evaluate = client.get(f"/api/v1/jobs/{new_filter['jobs']['evaluate']}").json()
    assert evaluate["inputs"] == {"model": new_filter["jobs"]["train"]}


@pytest.mark.parametrize(("body", "loc", "words"), [
    (sweep_body(grid={"train.noise.recall": [1.5]}), ["body", "grid", "train.noise.recall", 0],
     ["recall=1.5", "probability"]),
    (sweep_body(grid={"train.nope": [1]}), ["body", "grid", "train.nope"], ["unknown field", "known fields"]),
    (sweep_body(grid={"evaluat.steps": [1]}), ["body", "grid", "evaluat.steps"], ["no stage named", "evaluate"]),
    (sweep_body(grid={"train.data.corpus": ["/etc/passwd"]}), ["body", "grid", "train.data.corpus", 0],
     ["registry name"]),
    (sweep_body(variants={"x": {"ablate": None}}), ["body", "variants", "x", "ablate"], ["re-point"]),
    (sweep_body(seeds=["a"]), ["body", "seeds"], ["integers"]),
    (sweep_body(base={"stages": []}), ["body", "base"], ["non-empty 'stages'"]),
    (sweep_body(grid={"train.steps": "many"}), ["body", "grid", "train.steps"], ["non-empty list"]),
])
def test_bad_sweeps_are_422_naming_field_value_and_fix(client: TestClient, body: dict[str, Any], loc: list[Any],
                                                       words: list[str]) -> None:
    r = post(client, body)
    assert r.status_code == 422, r.text
    match = [p for p in r.json()["detail"] if p["loc"] == loc]
    assert match, r.json()["detail"]
    assert all(w in match[0]["msg"] for w in words), match[0]["msg"]


def test_the_list_pages_newest_first_through_next_cursor(client: TestClient) -> None:
    ids = [post(client, sweep_body(name=f"page-{i}", seeds=[i])).json()["id"] for i in range(3)]
    assert all_pages(client, "/api/v1/sweeps") == ids[::-1]
    r = client.get("/api/v1/sweeps", params={"cursor": "Zm9v"})  # well-formed base64, not a cursor
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == ("cursor='Zm9v': not a cursor this API issued; pass `next_cursor` from "
                                            "the previous page unchanged")


def test_unknown_sweep_is_404_and_body_shape_is_checked(client: TestClient) -> None:
    assert client.get("/api/v1/sweeps/nope").status_code == 404
    assert client.get("/api/v1/sweeps/00000000-0000-4000-8000-000000000000/report").status_code == 404
    assert post(client, {"kind": "pipeline", "base": {}}).status_code == 422
    assert post(client, {**sweep_body(), "extra": 1}).status_code == 422


def test_report_aggregates_the_ledger_results_and_serves_figures(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    pytest.importorskip("matplotlib")
    sweep = post(client, sweep_body(variants=None, seeds=[0, 1])).json()
    for cell in sweep["cells"][:3]:
        recall, seed = cell["params"]["train.noise.recall"], cell["seed"]
        history = [{"step": s, "metrics": {"eval/retain/loss": 5.0 - s / 10, "eval/forget/loss": 6.0 - s / 20}}
                   for s in (0, 5)]
        for name, job_id in cell["jobs"].items():
            metrics = {"eval/retain/loss": 4.0 + seed, "eval/forget/loss": 5.0 + recall}
            finish(factory, job_id, "succeeded", {"kind": name, "metrics": metrics, "history": history})
    run_cell(factory, sweep["cells"][3], "failed")
    r = client.get(f"/api/v1/sweeps/{sweep['id']}/report")
    assert r.status_code == 200, r.text
    body = r.json()
    final = body["report"]["tables"][0]
    row = next(row for row in final["rows"] if row["params"] == {"train.noise.recall": 1.0})
    stat = row["stats"]["eval/retain/loss"]
    assert (stat["mean"], stat["n"]) == (4.5, 2) and abs(stat["std"] - 0.7071) < 1e-3
    assert body["report"]["n_cells"] == 4 and body["report"]["statuses"] == {"succeeded": 3, "failed": 1}
    assert "mean ± sample std" in body["markdown"]
    assert body["figures"], body
    for link in body["figures"].values():
        png = client.get(link)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/api/v1/sweeps/{sweep['id']}/report/..%2Fetc.png").status_code == 404
    assert "/tmp" not in r.text and ".tmp-" not in r.text  # no server paths in the response


def test_simultaneous_submissions_sharing_cells_start_each_cell_once(client: TestClient,
                                                                     factory: sessionmaker[Session]) -> None:
    """Eight clients submit the same sweep at once (no idempotency key): every submission is a sweep of its own, but
    each cell gets exactly one pipeline, the others attach to it (PostgreSQL: advisory lock; SQLite: the first write
    of a submission takes the database's write lock before it reads which cells exist)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: post(client, sweep_body()), range(8)))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
    assert n_pipelines(factory) == 8  # 2 variants x 2 recalls x 2 seeds, once each
    pipelines = {tuple(sorted(c["pipeline_id"] for c in r.json()["cells"])) for r in responses}
    assert len(pipelines) == 1


def test_a_cell_whose_stage_is_refused_is_a_422_for_that_cell_not_a_crash(client: TestClient) -> None:
    """A refused train stage (an unknown corpus) must not break the cells' later stages that read from it."""
    r = post(client, sweep_body(grid={"train.data.corpus": ["wiki-bilingual", "wiki-bilngual"]}))
    assert r.status_code == 422, r.text
    problems = r.json()["detail"]
    assert problems and all(p["loc"][:2] == ["body", "cells"] for p in problems)
    assert any("wiki-bilngual" in p["msg"] and "wiki-bilingual" in p["msg"] for p in problems), problems


def test_simultaneous_submissions_with_one_key_create_one_sweep_and_ring_once(
        client: TestClient, factory: sessionmaker[Session], enqueuer: RecordingEnqueuer) -> None:
    """The losers of the race to one Idempotency-Key roll back and get the winner's sweep; the doorbell rings once
    for each of the winner's jobs."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: post(client, sweep_body(), **{"Idempotency-Key": "burst"}), range(8)))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
    assert len({r.json()["id"] for r in responses}) == 1
    assert n_pipelines(factory) == 8
    trains = {c["jobs"]["train"] for c in responses[0].json()["cells"]}
    assert sorted(enqueuer.job_ids) == sorted(trains)  # each once
