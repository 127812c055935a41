"""/api/v1/sweeps in-process (TestClient) against a real ledger on SQLite and PostgreSQL: submission, dedupe by cell
id across resubmissions (succeeded reused, running attached, failed/cancelled rerun), cancel, resume, 422s, report.

Job outcomes are written with the ledger's own repository functions (claim, mark_*), as a supervisor would."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db import sweeps as sweep_repo
from api.db.models import Job, Pipeline
from api.db.session import session_scope
from api.db.sweeps import Lineage
from api.main import create_app
from api.sweeps import _job_keys
from sgtm_engine.local_sweep import stage_folders
from sgtm_engine.sweep import parse_sweep, stage_keys
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


@pytest.fixture
def client(settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    with TestClient(create_app(settings, enqueuer=enqueuer), headers=AUTH) as c:  # reads need a token too
        yield c


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


# ---------------------------------------------------------------------------------------------------------------------
# Stages the cells share


def shared_body(**extra: Any) -> dict[str, Any]:
    """Two methods per seed, each attacked against the seed's one no-filter `reference` (the demo's shape)."""
    body: dict[str, Any] = {
        "kind": "sweep", "name": "shared",
        "base": {"stages": [
            {"name": "reference", "kind": "train", "spec": {**copy.deepcopy(TINY), "masking": {"strategy": "none"}}},
            {"name": "train", "kind": "train", "spec": copy.deepcopy(TINY)},
            {"name": "attack", "kind": "attack", "inputs": {"model": "train", "baseline": "reference"},
             "spec": {"steps": 5, "eval_every": 5}},
        ]},
        "variants": {"sgtm": {"train.masking.strategy": "sgtm"},
                     "gradient_routing": {"train.masking.strategy": "gradient_routing"}},
        "seeds": [0, 1],
    }
    body.update(extra)
    return body


def n_jobs(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_stage_the_cells_share_runs_once_as_in_a_local_sweep(
        client: TestClient, factory: sessionmaker[Session], enqueuer: RecordingEnqueuer, tmp_path: Any) -> None:
    sweep = post(client, shared_body()).json()
    cells = {(c["variant"], c["seed"]): c for c in sweep["cells"]}
    # one reference per seed, in the first cell's pipeline; the other method's attack reads it there
    for seed in (0, 1):
        first, other = cells[("sgtm", seed)], cells[("gradient_routing", seed)]
        assert other["jobs"]["reference"] == first["jobs"]["reference"], seed
        attack = client.get(f"/api/v1/jobs/{other['jobs']['attack']}").json()
        assert attack["inputs"] == {"model": other["jobs"]["train"], "baseline": first["jobs"]["reference"]}
        own = client.get(f"/api/v1/pipelines/{other['pipeline_id']}").json()
        assert sorted(j["stage_name"] for j in own["jobs"]) == ["attack", "train"], own
    assert cells[("sgtm", 0)]["jobs"]["reference"] != cells[("sgtm", 1)]["jobs"]["reference"]
    # as many jobs as `sgtm sweep --local` has stage folders for the same document
    plan = parse_sweep(shared_body())
    folders = {folder for cell in plan.cells for folder in stage_folders(cell, tmp_path).values()}
    assert n_jobs(factory) == len(folders) == 2 + 4 + 4
    assert len(enqueuer.job_ids) == 2 + 4  # the parentless ones: references and trains


def test_job_rows_give_the_stage_keys_the_cells_give() -> None:
    """The service finds reusable jobs by the keys of their stored specs and edges; a cell's stages must give the
    same keys, or a resume would run a shared stage again."""
    plan = parse_sweep(shared_body())
    cell = plan.cells[0]
    jobs = {s["name"]: Job(id=s["name"] + "-id", kind=s["kind"], spec=json.loads(json.dumps(s["spec"])),
                           stage_name=s["name"], pipeline_id="p") for s in cell.stages}
    edges = {jobs[s["name"]].id: {role: jobs[parent].id for role, parent in s["inputs"].items()}
             for s in cell.stages if s["inputs"]}
    found = Lineage(own={"p": list(jobs.values())}, shared={"p": {}}, jobs={j.id: j for j in jobs.values()},
                    inputs=edges)
    keys = stage_keys(cell.stages)
    assert _job_keys(found) == {jobs[name].id: key for name, key in keys.items()}


def test_resume_reruns_a_failed_shared_stage_once_and_keeps_what_succeeded(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    sweep = post(client, shared_body()).json()
    cells = {(c["variant"], c["seed"]): c for c in sweep["cells"]}
    reference = cells[("sgtm", 0)]["jobs"]["reference"]
    for cell in sweep["cells"]:
        finish(factory, cell["jobs"]["train"], "succeeded")
    finish(factory, reference, "failed")  # both seed-0 attacks can never run
    after = client.get(f"/api/v1/sweeps/{sweep['id']}").json()
    assert after["counts"] == {"failed": 2, "queued": 2}
    before = n_jobs(factory)

    resumed = client.post(f"/api/v1/sweeps/{sweep['id']}/resume", headers=AUTH).json()
    assert n_jobs(factory) == before + 1 + 2  # one new reference, the two attacks; the trains had succeeded
    again = {(c["variant"], c["seed"]): c for c in resumed["cells"]}
    new_reference = again[("sgtm", 0)]["jobs"]["reference"]
    assert new_reference != reference and again[("gradient_routing", 0)]["jobs"]["reference"] == new_reference
    for variant in ("sgtm", "gradient_routing"):
        cell = again[(variant, 0)]
        assert cell["jobs"]["train"] == cells[(variant, 0)]["jobs"]["train"]  # succeeded: read, not rerun
        attack = client.get(f"/api/v1/jobs/{cell['jobs']['attack']}").json()
        assert attack["inputs"] == {"model": cell["jobs"]["train"], "baseline": new_reference}
        assert attack["status"] == "queued"
    assert again[("sgtm", 1)]["pipeline_id"] == cells[("sgtm", 1)]["pipeline_id"]  # queued: left alone


def test_cancelling_a_sweep_keeps_the_shared_stages_another_sweep_needs(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    first = post(client, shared_body(seeds=[0])).json()
    cells = {c["variant"]: c for c in first["cells"]}
    reference = cells["sgtm"]["jobs"]["reference"]
    # a second sweep attaches to the gradient-routing cell, whose attack reads the sgtm cell's reference
    second = post(client, shared_body(seeds=[0], variants={"gradient_routing": {
        "train.masking.strategy": "gradient_routing"}}, name="second")).json()
    assert second["cells"][0]["pipeline_id"] == cells["gradient_routing"]["pipeline_id"]
    assert second["cells"][0]["jobs"]["reference"] == reference

    client.post(f"/api/v1/sweeps/{first['id']}/cancel", headers=AUTH)
    assert client.get(f"/api/v1/jobs/{reference}").json()["status"] == "queued"  # the second sweep reads it
    assert client.get(f"/api/v1/jobs/{cells['sgtm']['jobs']['train']}").json()["status"] == "cancelled"
    assert client.get(f"/api/v1/sweeps/{second['id']}").json()["counts"] == {"queued": 1}
    client.post(f"/api/v1/sweeps/{second['id']}/cancel", headers=AUTH)
    assert client.get(f"/api/v1/jobs/{reference}").json()["status"] == "cancelled"


def test_a_resume_never_reads_a_shared_stage_that_is_being_cancelled(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    sweep = post(client, shared_body(seeds=[0])).json()
    cells = {c["variant"]: c for c in sweep["cells"]}
    reference = cells["sgtm"]["jobs"]["reference"]
    with session_scope(factory) as session:
        assert repo.claim(session, job_id=reference, owner="test")  # running: asked to stop, not stopped yet
    client.post(f"/api/v1/sweeps/{sweep['id']}/cancel", headers=AUTH)
    assert client.get(f"/api/v1/jobs/{reference}").json()["cancel_requested_at"] is not None

    resumed = {c["variant"]: c for c in client.post(f"/api/v1/sweeps/{sweep['id']}/resume",
                                                    headers=AUTH).json()["cells"]}
    assert resumed["sgtm"]["pipeline_id"] == cells["sgtm"]["pipeline_id"]  # still running: left alone
    rerun = resumed["gradient_routing"]
    assert rerun["pipeline_id"] != cells["gradient_routing"]["pipeline_id"]
    assert rerun["jobs"]["reference"] != reference  # its own, not the one about to be cancelled
    assert client.get(f"/api/v1/jobs/{rerun['jobs']['reference']}").json()["status"] == "queued"


def test_a_resubmission_reads_the_stages_that_succeeded_in_the_ledger(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    """The new cells' stages (keys from the sweep document) meet the ledger's jobs (keys from stored specs): the
    keys must agree through the database's JSON, or every resubmission trains again."""
    first = post(client, shared_body(seeds=[0])).json()
    cells = {c["variant"]: c for c in first["cells"]}
    for cell in first["cells"]:
        finish(factory, cell["jobs"]["train"], "succeeded")
    finish(factory, cells["sgtm"]["jobs"]["reference"], "failed")
    before = n_jobs(factory)

    second = {c["variant"]: c for c in post(client, shared_body(seeds=[0])).json()["cells"]}
    assert n_jobs(factory) == before + 1 + 2  # a reference, two attacks
    for variant, cell in second.items():
        assert cell["pipeline_id"] != cells[variant]["pipeline_id"]
        assert cell["jobs"]["train"] == cells[variant]["jobs"]["train"]
    assert second["sgtm"]["jobs"]["reference"] == second["gradient_routing"]["jobs"]["reference"]


def test_a_cell_lists_and_reports_every_stage_it_shares_by_its_own_names(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    """Shared by key, whatever the name: the no-filter cell's `train` is the other cells' `reference`; a shared stage
    that none of the cell's own stages reads (its evaluation, under a grid of attack settings) is still the cell's."""
    body = shared_body(seeds=[0], variants={
        "no_filter": {"train.masking.strategy": "none", "reference": None, "attack": None},
        "sgtm_5": {"train.masking.strategy": "sgtm", "attack.steps": 5},
        "sgtm_6": {"train.masking.strategy": "sgtm", "attack.steps": 6}})
    body["base"]["stages"].insert(2, {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "train"}})
    r = post(client, body)
    assert r.status_code == 202, r.text
    cells = r.json()["cells"]
    no_filter, sgtm_5, sgtm_6 = cells
    for cell in (sgtm_5, sgtm_6):
        assert cell["jobs"]["reference"] == no_filter["jobs"]["train"]
        assert set(cell["jobs"]) == {"reference", "train", "evaluate", "attack"}
    assert sgtm_6["jobs"]["evaluate"] == sgtm_5["jobs"]["evaluate"]  # read by none of sgtm_6's own stages
    assert sgtm_6["jobs"]["train"] == sgtm_5["jobs"]["train"] and sgtm_6["jobs"]["attack"] != sgtm_5["jobs"]["attack"]
    assert n_jobs(factory) == 2 + 1 + 1 + 2  # no_filter's train and evaluate, the sgtm train and evaluate, 2 attacks
    in_order = dict.fromkeys(c["jobs"][s] for s in ("train", "reference", "evaluate", "attack") for c in cells
                             if s in c["jobs"])
    for job_id in in_order:  # parents first
        finish(factory, job_id, "succeeded", {"kind": "x", "metrics": {"eval/forget/loss": 7.0}})
    with session_scope(factory) as session:
        records = sweep_repo.report_records(session, sweep_id=r.json()["id"])
    for record in records:
        assert set(record["stages"]) == set(next(c for c in cells if c["cell_id"] == record["cell_id"])["jobs"])


def test_two_stages_of_one_cell_that_compute_the_same_model_run_once(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    """The attack matrix's no-filter cell attacks its `train` against its `reference`: the same spec, one job (as
    one stage folder locally); the cell still lists both names."""
    cell = post(client, shared_body(seeds=[0], variants={"no_filter": {"train.masking.strategy": "none"}})
                ).json()["cells"][0]
    assert cell["jobs"]["reference"] == cell["jobs"]["train"]
    attack = client.get(f"/api/v1/jobs/{cell['jobs']['attack']}").json()
    assert attack["inputs"] == {"model": cell["jobs"]["train"], "baseline": cell["jobs"]["train"]}
    assert n_jobs(factory) == 2
    pipeline = client.get(f"/api/v1/pipelines/{cell['pipeline_id']}").json()
    assert len(pipeline["jobs"]) == 2
    finish(factory, cell["jobs"]["train"], "failed")
    sweeps = client.get("/api/v1/sweeps").json()["items"]
    resumed = client.post(f"/api/v1/sweeps/{sweeps[0]['id']}/resume", headers=AUTH).json()["cells"][0]
    assert resumed["jobs"]["reference"] == resumed["jobs"]["train"] != cell["jobs"]["train"]
    assert n_jobs(factory) == 2 + 2
