"""The in-process API (TestClient, sending the token) on the parametrized ledger of tests/ledger_fixtures.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from api.main import create_app
from tests.ledger_fixtures import TOKEN, RecordingEnqueuer


@pytest.fixture
def client(settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    with TestClient(create_app(settings, enqueuer=enqueuer), headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c
