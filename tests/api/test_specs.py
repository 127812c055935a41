"""The API's spec layer agrees with the engine: method labels, and every shipped recipe is a valid pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.client_cli import RECIPE_DIR, _load_body
from api.config import Settings
from api.main import create_app
from api.specs import _method
from sgtm_engine.config import StageKind, TrainSpec, from_dict, method_name
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
