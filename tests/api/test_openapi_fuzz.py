"""Schemathesis against the API's own OpenAPI document, in-process, on SQLite and PostgreSQL: no valid or invalid
input it generates produces a 500, and responses match the documented status codes and schemas."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from api.config import Settings
from api.liveness import write_executor_heartbeat
from api.main import create_app
from tests.ledger_fixtures import TOKEN, RecordingEnqueuer

pytestmark = pytest.mark.slow  # hypothesis-driven: tens of seconds per case
EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_the_api_never_returns_500(settings: Settings, mode: schemathesis.GenerationMode) -> None:
    settings.data_root.mkdir(parents=True, exist_ok=True)  # heartbeats as a running executor writes them, so
    # /ready answers 200 rather than its (correct) 503
    app = create_app(settings, enqueuer=RecordingEnqueuer())
    with TestClient(app):  # runs the lifespan
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 9
        for operation in operations:

            @given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                                 database=None)
            def check(case: schemathesis.Case) -> None:
                write_executor_heartbeat(settings.data_root)
                if case.path.endswith("/events"):  # a stream that ends, even for a live job
                    case.query = {**(case.query or {}), "follow": "false"}
                case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

            try:
                check()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing to break in /health and /ready
