"""Settings: environment parsing, and deployed mode refusing default secrets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.config import Settings
from api.main import create_app

STRONG = "x" * 40
PG = "postgresql+psycopg://sgtm:a-long-generated-password@db:5432/sgtm"


def test_lists_come_from_comma_separated_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGTM_API_TOKENS", "aaa,bbb")
    monkeypatch.setenv("SGTM_WORKER_QUEUES", "gpu")
    monkeypatch.setenv("SGTM_ENGINE_COMMAND", "python3 -m sgtm_engine")
    s = Settings(_env_file=None)
    assert [t.get_secret_value() for t in s.api_tokens] == ["aaa", "bbb"]
    assert s.worker_queues == ["gpu"] and s.engine_command == ["python3", "-m", "sgtm_engine"]
    assert "aaa" not in repr(s)  # secrets stay out of logs


@pytest.mark.parametrize(("changes", "words"), [
    ({"api_tokens": ["changeme"]}, "SGTM_API_TOKENS[0]"),
    ({"api_tokens": ["short"]}, "too weak"),
    ({"database_url": "postgresql+psycopg://sgtm:postgres@db/sgtm"}, "default value"),
    ({"database_url": None}, "PostgreSQL URL"),
    ({"mlflow_tracking_uri": None}, "MLFLOW_TRACKING_URI"),
])
def test_deployed_mode_refuses_weak_settings(changes: dict[str, object], words: str) -> None:
    good: dict[str, object] = {"mode": "deployed", "api_tokens": [STRONG], "database_url": PG,
                               "mlflow_tracking_uri": "http://mlflow:5000"}
    Settings(_env_file=None, **good)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=words.replace("[", r"\[")):
        Settings(_env_file=None, **{**good, **changes})  # type: ignore[arg-type]


def test_the_api_refuses_to_start_without_tokens(tmp_path: object) -> None:
    with pytest.raises(RuntimeError, match="SGTM_API_TOKENS"):
        create_app(Settings(_env_file=None, api_tokens=[], data_root=tmp_path))  # type: ignore[arg-type]


def test_a_start_up_error_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    token, password = "abcdefghijklmnopqrstuvwxyz-SECRET-TAIL", "db-password-tail"
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None, mode="deployed", api_tokens=[token],  # type: ignore[arg-type]
                 database_url=f"postgresql+psycopg://sgtm:{password}@db/sgtm", mlflow_tracking_uri=None)
    text = str(error.value)
    assert "MLFLOW_TRACKING_URI" in text and "TAIL" not in text and "tail" not in text


@pytest.mark.parametrize("token", ["x", "changeme", "short-token"])
def test_the_api_refuses_a_weak_token_in_embedded_mode_too(token: str, tmp_path: object) -> None:
    with pytest.raises(RuntimeError, match=r"SGTM_API_TOKENS\[0\]: too weak") as error:
        create_app(Settings(_env_file=None, api_tokens=[token], data_root=tmp_path))  # type: ignore[arg-type]
    assert token not in str(error.value)
