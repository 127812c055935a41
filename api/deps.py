"""Annotated dependencies: settings, a session per request, the enqueuer, and bearer-token auth."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.errors import Unauthorized
from api.queue import Enqueuer

_bearer = HTTPBearer(auto_error=False, description="A token from SGTM_API_TOKENS (embedded: <data_root>/token).")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_session_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.session_factory  # type: ignore[no-any-return]


def get_session(factory: Annotated[sessionmaker[Session], Depends(get_session_factory)]) -> Iterator[Session]:
    with factory() as session:
        yield session


def get_enqueuer(request: Request) -> Enqueuer:
    return request.app.state.enqueuer  # type: ignore[no-any-return]


def require_token(settings: Annotated[Settings, Depends(get_settings)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The caller's principal ('token-<i>'). Compares sha256 digests with `hmac.compare_digest` against every
    configured token, so neither the position of a match nor a token's length shows in the timing."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    given = hashlib.sha256(credentials.credentials.encode()).digest()
    matched = -1
    for i, token in enumerate(settings.api_tokens):
        expected = hashlib.sha256(token.get_secret_value().encode()).digest()
        if hmac.compare_digest(given, expected) and matched < 0:
            matched = i
    if matched < 0:
        raise Unauthorized("invalid bearer token")
    return f"token-{matched}"


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
EnqueuerDep = Annotated[Enqueuer, Depends(get_enqueuer)]
AuthDep = Annotated[str, Depends(require_token)]
