"""The API's spec layer agrees with the engine: method labels, every shipped recipe is a valid pipeline, a recipe
`sgtm run` accepts is one `POST /api/v1/pipelines` accepts, and a sweep `sgtm sweep --local` accepts is one
`POST /api/v1/sweeps` accepts, and the other way round."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.client_cli import _load_body
from api.config import Settings
from api.main import create_app
from api.specs import _method
from sgtm_engine.config import StageKind, TrainSpec, from_dict, method_name
from sgtm_engine.errors import ConfigError
from sgtm_engine.recipe import RECIPE_DIR, load_recipe
from sgtm_engine.sweep import parse_sweep
from sgtm_engine.yamlio import load_file
from tests.ledger_fixtures import TOKEN, RecordingEnqueuer


@pytest.mark.parametrize("spec", [
    {}, {"masking": {"strategy": "gradient_routing"}}, {"masking": {"strategy": "none"}},
    {"masking": {"strategy": "none"}, "filter": {"kind": "weak"}},
    {"masking": {"strategy": "none"}, "filter": {"kind": "strict"}},
    {"masking": {"strategy": "none"}, "data": {"conditional": True}},
])
def test_method_labels_match_the_engine(spec: dict) -> None:
    assert _method(StageKind.TRAIN, from_dict(TrainSpec, spec)) == method_name(from_dict(TrainSpec, spec))


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[TestClient]:
    from api.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'l.db'}"
    upgrade(url)
    settings = Settings(_env_file=None, database_url=url, api_tokens=[TOKEN], data_root=tmp_path)
    with TestClient(create_app(settings, enqueuer=RecordingEnqueuer())) as client:
        yield client


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPE_DIR.glob("*.yaml")))
def test_every_shipped_recipe_is_a_valid_pipeline(sqlite_client: TestClient, recipe: str) -> None:
    body = _load_body(str(RECIPE_DIR / recipe), [])
    r = sqlite_client.post("/api/v1/pipelines", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text


# ---------------------------------------------------------------------------------------------------------------------
# One stage-list parser: what `sgtm run` accepts, POST /api/v1/pipelines accepts, and the other way round


def _stage(name: str, kind: str = "train", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "spec": {"steps": 3}, **extra} if kind == "train" else \
        {"name": name, "kind": kind, **extra}


EDGE_CASES: dict[str, dict[str, Any]] = {
    "one-letter-name": {"stages": [_stage("a")]},
    "name-of-32": {"stages": [_stage("t" * 32)]},
    "name-of-33": {"stages": [_stage("t" * 33)]},
    "upper-case-name": {"stages": [_stage("Train")]},
    "digit-first-name": {"stages": [_stage("1train")]},
    "dotted-name": {"stages": [_stage("train.x")]},
    "dashes-and-underscores": {"stages": [_stage("train_1-b")]},
    "recipe-name-with-space": {"name": "my recipe", "stages": [_stage("train")]},
    "description-and-experiment": {"name": "r", "description": "free text", "experiment": "exp",
                                   "stages": [_stage("train")]},
    "experiment-of-128": {"experiment": "e" * 128, "stages": [_stage("train")]},
    "experiment-of-129": {"experiment": "e" * 129, "stages": [_stage("train")]},
    "experiment-with-space": {"experiment": "my runs", "stages": [_stage("train")]},
    "experiment-with-plus": {"experiment": "sgtm+rmu", "stages": [_stage("train")]},
    "experiment-not-text": {"experiment": 5, "stages": [_stage("train")]},
    "experiment-ending-in-a-newline": {"experiment": "exp\n", "stages": [_stage("train")]},
    "name-ending-in-a-newline": {"name": "r\n", "stages": [_stage("train\n")]},
    "null-description-and-experiment": {"description": None, "experiment": None, "stages": [_stage("train")]},
    "description-of-4000": {"description": "d" * 4000, "stages": [_stage("train")]},
    "description-of-4001": {"description": "d" * 4001, "stages": [_stage("train")]},
    "description-not-text": {"description": ["a", "list"], "stages": [_stage("train")]},
    "unknown-top-level-key": {"stages": [_stage("train")], "stagez": []},
    "queue-and-gpus": {"stages": [_stage("train", queue="gpu", gpus=2)]},
    "too-many-gpus": {"stages": [_stage("train", gpus=9)]},
    "cpu-queue-with-gpus": {"stages": [_stage("train", queue="cpu", gpus=2)]},
    "attack-on-gpus": {"stages": [_stage("train"), _stage("attack", "attack", inputs={"model": "train"}, gpus=2,
                                                          spec={"reference_forget_loss": 5.0})]},
    "evaluate-on-gpus": {"stages": [_stage("train"), _stage("ev", "evaluate", inputs={"model": "train"}, gpus=2)]},
    "compiled-train": {"stages": [_stage("train", spec={"runtime": {"compile": True}})]},
    "compiled-evaluate": {"stages": [_stage("train"), _stage("ev", "evaluate", inputs={"model": "train"},
                                                      spec={"runtime": {"compile": True}})]},
    "unknown-stage-key": {"stages": [_stage("train", spce={})]},
    "evaluate-without-model": {"stages": [_stage("train"), _stage("evaluate", "evaluate")]},
    "input-names-a-later-stage": {"stages": [_stage("evaluate", "evaluate", inputs={"model": "train"}),
                                             _stage("train")]},
    "duplicate-names": {"stages": [_stage("train"), _stage("train")]},
    "unknown-input-role": {"stages": [_stage("train"), _stage("ev", "evaluate", inputs={"model": "train",
                                                                                        "victim": "train"})]},
    "upper-case-input-role": {"stages": [_stage("train"), _stage("ev", "evaluate", inputs={"Model": "train"})]},
    "model-from-an-evaluation": {"stages": [_stage("train"), _stage("ev", "evaluate", inputs={"model": "train"}),
                                            _stage("ab", "ablate", inputs={"model": "ev"})]},
    "attack-with-baseline": {"stages": [_stage("base"), _stage("train"),
                                        _stage("attack", "attack", inputs={"model": "train", "baseline": "base"})]},
    "spec-typo": {"stages": [{"name": "train", "kind": "train", "spec": {"stepz": 3}}]},
    "register-a-model": {"stages": [{"name": "train", "kind": "train", "spec": {"steps": 3, "register": "m-1.b"}}]},
    "register-a-bad-name": {"stages": [{"name": "train", "kind": "train", "spec": {"register": "a/b"}}]},
    "register-an-evaluation-that-writes-no-model": {"stages": [
        _stage("train"), _stage("ev", "evaluate", inputs={"model": "train"}, spec={"ablate": None, "register": "m"})]},
    "unknown-kind": {"stages": [_stage("bake", "bake")]},
    "no-stages": {"stages": []},
}
SHIPPED = {p.stem: load_file(p) for p in sorted(RECIPE_DIR.glob("*.yaml"))}


@pytest.mark.parametrize("body", [*SHIPPED.values(), *EDGE_CASES.values()], ids=[*SHIPPED, *EDGE_CASES])
def test_sgtm_run_and_the_api_accept_the_same_recipes(sqlite_client: TestClient, body: dict[str, Any]) -> None:
    _both_accept_or_refuse(load_recipe, sqlite_client, "/api/v1/pipelines", body)


def _both_accept_or_refuse(parse: Any, client: TestClient, route: str, body: dict[str, Any]) -> None:
    """The engine's parser takes `body` exactly when the API's route does (202, else a 422)."""
    try:
        parse(copy.deepcopy(body))
        runs = True
    except ConfigError:
        runs = False
    r = client.post(route, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code in (202, 422), r.text
    assert runs == (r.status_code == 202), r.text


def test_the_api_bodies_have_the_fields_of_the_engine_s_documents() -> None:
    """A field added to a recipe, a stage or a sweep in one place and not the other would be refused by one door."""
    from api.schemas import PipelineCreate, StageCreate, SweepCreate
    from sgtm_engine.config.stage_list import RECIPE_KEYS, STAGE_KEYS
    from sgtm_engine.sweep import TOP_KEYS

    assert set(PipelineCreate.model_fields) == set(RECIPE_KEYS)
    assert set(StageCreate.model_fields) == set(STAGE_KEYS)
    assert set(SweepCreate.model_fields) == set(TOP_KEYS)


def _sweep(**fields: Any) -> dict[str, Any]:
    return {"base": {"stages": [_stage("train")]}, "seeds": [0, 1], **fields}


SWEEP_EDGE_CASES: dict[str, dict[str, Any]] = {
    "plain": _sweep(),
    "name-and-description": _sweep(name="my-sweep", description="free text"),
    "name-with-space": _sweep(name="my sweep"),
    "experiment-of-128": _sweep(experiment="e" * 128),
    "experiment-of-129": _sweep(experiment="e" * 129),
    "experiment-with-plus": _sweep(experiment="sgtm+rmu"),
    "experiment-with-space": _sweep(experiment="my runs"),
    "description-of-4001": _sweep(description="d" * 4001),
    "description-not-text": _sweep(description=7),
    "variants-and-grid": _sweep(variants={"short": {"train.steps": 2}, "sgtm+long": {"train.steps": 4}},
                                grid={"train.optim.lr": [1e-3, 3e-3]}),
    "experiment-ending-in-a-newline": _sweep(experiment="exp\n"),
    "variant-name-ending-in-a-newline": _sweep(variants={"short\n": {"train.steps": 2}}),
    "unknown-key": _sweep(seedz=[1]),
    "no-base": {"seeds": [0]},
}


@pytest.mark.parametrize("body", SWEEP_EDGE_CASES.values(), ids=SWEEP_EDGE_CASES)
def test_sgtm_sweep_and_the_api_accept_the_same_sweeps(sqlite_client: TestClient, body: dict[str, Any]) -> None:
    _both_accept_or_refuse(parse_sweep, sqlite_client, "/api/v1/sweeps", body)


def test_a_bad_registered_model_name_is_a_422_naming_the_field(sqlite_client: TestClient) -> None:
    body = {"stages": [{"name": "train", "kind": "train", "spec": {"register": "a/b"}}]}
    r = sqlite_client.post("/api/v1/pipelines", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and "register" in r.text and "a/b" in r.text, r.text


@pytest.mark.parametrize("body", [
    {"stages": [_stage("train")], "stagez": []},
    {"stages": [_stage("train", spce={})]},
    {"stages": [_stage("train", "trian")]},
    {"stages": [_stage("train"), _stage("ev", "evaluate", inputs={"model": "train"}, gpuz=1)]},
], ids=["top-level-key", "stage-key", "stage-kind", "second-stage-key"])
def test_a_typo_reads_the_same_from_sgtm_run_and_from_the_api(sqlite_client: TestClient, body: dict[str, Any]) -> None:
    """Pydantic refuses these before the engine's parser sees them; the 422 still words them as `sgtm run` does,
    with its did-you-mean, and without a false "field required" for the field the typo meant."""
    with pytest.raises(ConfigError) as engine:
        load_recipe(copy.deepcopy(body))
    r = sqlite_client.post("/api/v1/pipelines", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422, r.text
    api = [(tuple(p["loc"]), p["msg"]) for p in r.json()["detail"]]
    assert api == [(("body", *p.loc), p.msg) for p in engine.value.problems]
    assert "did you mean" in api[0][1]
