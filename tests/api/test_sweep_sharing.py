"""Sweeps in the service run a stage that several cells share once, as `sgtm sweep --local` does: one job per stage
key, recorded under each cell's own names (`pipelines.shared_stages`), kept through resubmission, resume and cancel.

In-process (TestClient) against a real ledger on SQLite and PostgreSQL; job outcomes are written with the ledger's own
repository functions, as a supervisor would."""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.db import jobs as repo
from api.db import sweeps as sweep_repo
from api.db.models import Job
from api.db.session import session_scope
from api.db.sweeps import Lineage
from api.sweeps import _job_keys
from sgtm_engine.local_sweep import stage_folders
from sgtm_engine.sweep import parse_sweep, stage_keys
from tests.api.test_sweeps import AUTH, TINY, finish, post
from tests.ledger_fixtures import RecordingEnqueuer


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


def test_a_rerun_never_reads_a_stage_that_is_being_cancelled(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    """Two submissions made a reference each (nothing to share yet). The second's is running with a cancel
    requested, the first's failed: a third submission reruns the first cell with a new reference of its own, not
    the one about to stop; a cell whose shared stage is still running is active, and is left alone."""
    sgtm = {"sgtm": {"train.masking.strategy": "sgtm"}}
    routing = {"gradient_routing": {"train.masking.strategy": "gradient_routing"}}
    first = post(client, shared_body(seeds=[0], variants=sgtm)).json()["cells"][0]
    second = post(client, shared_body(seeds=[0], variants=routing, name="second")).json()
    stopping = second["cells"][0]["jobs"]["reference"]
    assert stopping != first["jobs"]["reference"]
    with session_scope(factory) as session:
        assert repo.claim(session, job_id=stopping, owner="test")  # running: asked to stop, not stopped yet
    client.post(f"/api/v1/sweeps/{second['id']}/cancel", headers=AUTH)
    assert client.get(f"/api/v1/jobs/{stopping}").json()["cancel_requested_at"] is not None
    finish(factory, first["jobs"]["train"], "succeeded")
    finish(factory, first["jobs"]["reference"], "failed")

    third = {c["variant"]: c for c in post(client, shared_body(seeds=[0], variants={**sgtm, **routing},
                                                               name="third")).json()["cells"]}
    assert third["gradient_routing"]["pipeline_id"] == second["cells"][0]["pipeline_id"]  # active: attached
    rerun = third["sgtm"]
    assert rerun["pipeline_id"] != first["pipeline_id"]
    assert rerun["jobs"]["reference"] not in (stopping, first["jobs"]["reference"])
    assert rerun["jobs"]["train"] == first["jobs"]["train"]  # succeeded: read
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


def test_a_cell_has_not_succeeded_until_a_shared_stage_its_own_jobs_never_read_has(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    """Two attack settings share the method's evaluation, which only the first cell's pipeline holds: the second cell
    is finished, failed and run again with it."""
    body = shared_body(seeds=[0], variants={"a": {"attack.steps": 5}, "b": {"attack.steps": 6}})
    body["base"]["stages"].insert(2, {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "train"}})
    sweep = post(client, body).json()
    a, b = sweep["cells"]
    evaluate = a["jobs"]["evaluate"]
    assert b["jobs"]["evaluate"] == evaluate
    for job_id in dict.fromkeys([a["jobs"]["reference"], a["jobs"]["train"], a["jobs"]["attack"],
                                 b["jobs"]["attack"]]):
        finish(factory, job_id, "succeeded")
    with session_scope(factory) as session:  # b's own jobs are done; its evaluation is not
        assert not sweep_repo.is_finished(session, sweep_id=sweep["id"])
    assert client.get(f"/api/v1/sweeps/{sweep['id']}").json()["counts"] == {"queued": 2}
    finish(factory, evaluate, "failed")
    assert client.get(f"/api/v1/sweeps/{sweep['id']}").json()["counts"] == {"failed": 2}
    before = n_jobs(factory)
    resumed = client.post(f"/api/v1/sweeps/{sweep['id']}/resume", headers=AUTH).json()["cells"]
    assert n_jobs(factory) == before + 1  # one evaluation again, for both cells; nothing else
    assert resumed[0]["jobs"]["evaluate"] == resumed[1]["jobs"]["evaluate"] != evaluate
    assert resumed[1]["jobs"]["attack"] == b["jobs"]["attack"]
    only_shared = client.get(f"/api/v1/pipelines/{resumed[1]['pipeline_id']}").json()  # every stage is shared
    assert only_shared["jobs"] == [] and only_shared["status"] == "queued"
    assert only_shared["shared_stages"] == {n: resumed[1]["jobs"][n] for n in ("reference", "train", "evaluate",
                                                                               "attack")}


def test_a_sweep_is_not_finished_while_a_stage_it_shares_from_another_sweep_runs(
        client: TestClient, factory: sessionmaker[Session]) -> None:
    """The second sweep holds only the cell that reads the evaluation from the first sweep's other cell: its report
    waits for that evaluation, which no pipeline of its own holds."""
    body = shared_body(seeds=[0], variants={"a": {"attack.steps": 5}, "b": {"attack.steps": 6}})
    body["base"]["stages"].insert(2, {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "train"}})
    a, b = post(client, body).json()["cells"]
    only_b = post(client, {**body, "name": "only-b", "variants": {"b": {"attack.steps": 6}}}).json()
    assert only_b["cells"][0]["pipeline_id"] == b["pipeline_id"]  # attached
    for job_id in (a["jobs"]["reference"], a["jobs"]["train"], b["jobs"]["attack"]):
        finish(factory, job_id, "succeeded")
    with session_scope(factory) as session:
        assert not sweep_repo.is_finished(session, sweep_id=only_b["id"])  # a's evaluation is queued
    finish(factory, a["jobs"]["evaluate"], "succeeded")
    with session_scope(factory) as session:
        assert sweep_repo.is_finished(session, sweep_id=only_b["id"])
