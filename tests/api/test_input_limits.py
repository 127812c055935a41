"""Bad input is a 4xx naming the field, never a 500: lone surrogates, deep JSON, 64-bit overflows, oversized bodies
(413 before authentication), huge echoed values (cut short), and specs beyond the operator's limits (422 naming the
field, value, limit and setting)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from api.main import create_app
from tests.ledger_fixtures import TOKEN, RecordingEnqueuer

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
TINY = {"model": {"n_layer": 2, "d_model": 64, "context": 64}, "steps": 20, "batch_size": 4}


@pytest.fixture
def client(settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    with TestClient(create_app(settings, enqueuer=enqueuer), raise_server_exceptions=False) as c:
        yield c


def _post(client: TestClient, path: str, raw: bytes, headers: dict[str, str] | None = None) -> Any:
    return client.post(path, content=raw, headers=AUTH if headers is None else headers)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("path", "raw", "loc"), [
    ("/api/v1/jobs", b'{"kind": "\\ud800"}', ["body", "kind"]),
    ("/api/v1/jobs", b'{"kind": "train", "experiment": "x\\udfff"}', ["body", "experiment"]),
    ("/api/v1/jobs", b'{"kind": "train", "spec": {"model": {"n_layer": "\\ud800"}}}',
     ["body", "spec", "model", "n_layer"]),
    ("/api/v1/jobs", b'{"kind": "train", "spec": {"\\ud800": 1}}', ["body", "spec"]),
    ("/api/v1/pipelines", b'{"name": "\\ud800", "stages": []}', ["body", "name"]),
])
def test_a_lone_surrogate_is_a_422_naming_the_field(client: TestClient, path: str, raw: bytes,
                                                   loc: list[str]) -> None:
    r = _post(client, path, raw)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc and "surrogate" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize("ledger_url", ["sqlite", "postgresql"], indirect=True)
def test_deep_json_and_64_bit_overflows_are_422(client: TestClient) -> None:
    deep = b'{"kind": "train", "spec": ' + b'{"a":' * 500 + b"1" + b"}" * 500 + b"}"
    r = _post(client, "/api/v1/jobs", deep)
    assert r.status_code == 422 and "SGTM_MAX_JSON_DEPTH" in r.json()["detail"][0]["msg"]
    deep_list = b'{"kind": "train", "spec": {"model": ' + b"[" * 600 + b"]" * 600 + b"}}"
    assert _post(client, "/api/v1/jobs", deep_list).status_code == 422
    for seed in (2**63, -(2**63) - 1, 10**30):
        r = client.post("/api/v1/jobs", json={"kind": "train", "spec": {**TINY, "seed": seed}}, headers=AUTH)
        assert r.status_code == 422, r.text
        problem = r.json()["detail"][0]
        assert problem["loc"] == ["body", "spec", "seed"] and "2^63" in problem["msg"]
    ok = client.post("/api/v1/jobs", json={"kind": "train", "spec": {**TINY, "seed": 2**63 - 1}}, headers=AUTH)
    assert ok.status_code == 202, ok.text


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_an_oversized_body_is_413_before_authentication(client: TestClient, settings: Settings) -> None:
    big = b'{"kind": "train", "spec": {"x": "' + b"a" * (settings.max_body_bytes + 10) + b'"}}'
    for headers in ({"Content-Type": "application/json"}, {"Authorization": "Bearer nope"}, AUTH):
        r = _post(client, "/api/v1/jobs", big, headers)
        assert r.status_code == 413 and "SGTM_MAX_BODY_BYTES" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b" " * 65536

    r = client.post("/api/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_a_422_does_not_echo_a_huge_input(client: TestClient) -> None:
    huge = "a" * 500_000
    for body in ({"kind": "train", "spec": {**TINY, "steps": huge}},
                 {"kind": huge},
                 {"kind": "train", "spec": {**TINY, "model": {"n_layer": [1] * 50_000}}}):
        r = client.post("/api/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 422 and len(r.content) < 20_000, (r.status_code, len(r.content))


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("spec", "loc", "setting"), [
    ({**TINY, "steps": 10**12}, ["body", "spec", "steps"], "SGTM_MAX_STEPS"),
    ({**TINY, "batch_size": 10**6}, ["body", "spec", "batch_size"], "SGTM_MAX_BATCH_SIZE"),
    ({**TINY, "model": {"n_layer": 10**4, "d_model": 64, "context": 64}}, ["body", "spec", "model", "n_layer"],
     "SGTM_MAX_N_LAYER"),
    ({**TINY, "model": {"n_layer": 2, "d_model": 2**20, "n_head": 2**10, "context": 64}},
     ["body", "spec", "model", "d_model"], "SGTM_MAX_D_MODEL"),
    ({**TINY, "model": {"n_layer": 2, "d_model": 64, "context": 2**20}}, ["body", "spec", "model", "context"],
     "SGTM_MAX_CONTEXT"),
    ({**TINY, "model": {"n_layer": 128, "d_model": 8192, "n_head": 64, "context": 64}}, ["body", "spec", "model"],
     "SGTM_MAX_PARAMETERS"),
    ({**TINY, "batch_size": 4096, "model": {"n_layer": 12, "d_model": 1024, "n_head": 16, "context": 4096}},
     ["body", "spec", "model"], "SGTM_MAX_MEMORY_GB"),
])
def test_specs_beyond_the_limits_are_422_naming_field_value_limit_and_setting(
        client: TestClient, spec: dict[str, Any], loc: list[str], setting: str) -> None:
    r = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec}, headers=AUTH)
    assert r.status_code == 422, r.text
    problem = r.json()["detail"][0]
    assert problem["loc"] == loc and setting in problem["msg"] and "limit" in problem["msg"], problem
    pipeline = {"stages": [{"name": "train", "kind": "train", "spec": spec}]}
    r = client.post("/api/v1/pipelines", json=pipeline, headers=AUTH)
    assert r.status_code == 422 and setting in r.text


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_a_raised_setting_admits_the_spec(settings: Settings, enqueuer: RecordingEnqueuer) -> None:
    raised = settings.model_copy(update={"max_steps": 10**13})
    with TestClient(create_app(raised, enqueuer=enqueuer)) as client:
        r = client.post("/api/v1/jobs", json={"kind": "train", "spec": {**TINY, "steps": 10**12}}, headers=AUTH)
        assert r.status_code == 202, r.text


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_sweep_cells_are_bounded_by_a_setting(settings: Settings, enqueuer: RecordingEnqueuer) -> None:
    small = settings.model_copy(update={"max_sweep_cells": 3})
    sweep = {"name": "s", "base": {"stages": [{"name": "train", "kind": "train", "spec": TINY}]},
             "grid": {"train.optim.lr": [1e-3, 2e-3]}, "seeds": [1, 2]}
    with TestClient(create_app(small, enqueuer=enqueuer)) as client:
        r = client.post("/api/v1/sweeps", content=json.dumps(sweep), headers=AUTH)
        assert r.status_code == 422 and "at most 3" in r.text, r.text
