"""Annotated dependencies: settings, a session per request, the enqueuer, bearer-token auth and event-stream slots."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from api.config import Settings
from api.db.models import Job
from api.errors import InvalidRequest, Problem, Unauthorized, query_params
from api.ids import find_by_id
from api.queue import Enqueuer
from api.streams import EventStreams, StreamSlot
from sgtm_engine.config import unknown_key

_bearer = HTTPBearer(auto_error=False, description="A token from SGTM_API_TOKENS (embedded: <data_root>/token).")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A ledger session for one request, admitted only while the pool has a connection for it.

    Why the admission: a session keeps its connection until the response has been sent, and a sync endpoint's
    response is serialized on a worker thread. Without a cap, a burst can leave every worker thread blocked in the
    pool waiting for a connection while every connection belongs to a finished request waiting for a thread to
    serialize its response: nothing moves until the pool times out (a 503). Waiting here costs no thread, and a
    request that gets through never waits in the pool for long."""
    admission: anyio.Semaphore = request.app.state.ledger_admission
    try:
        with anyio.fail_after(request.app.state.settings.db_pool_timeout_s):
            await admission.acquire()
    except TimeoutError:
        raise PoolTimeout("no ledger connection came free in time") from None
    try:
        session = request.app.state.session_factory()
        try:
            yield session
        finally:
            # shielded: a client that hangs up still gets its connection returned; a limiter of its own: returning
            # a connection never queues for a thread behind the endpoints holding the default limiter's tokens
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
    finally:
        admission.release()


def known_query(request: Request) -> None:
    """A query parameter the route does not take is a 422 with a did-you-mean, as an unknown body key is:
    `?statuss=failed` would otherwise list every job, unfiltered."""
    route = request.scope.get("route")
    known = query_params(route)
    owner = f"the query of {request.method} {getattr(route, 'path', request.url.path)}"
    problems = [Problem(("query", key), unknown_key((), key, known, owner).msg, request.query_params[key])
                for key in request.query_params if key not in known]
    if problems:
        raise InvalidRequest(problems)


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


def require_reader(settings: Annotated[Settings, Depends(get_settings)],
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """Reads (specs, metrics, events, reports, server paths) need a token too, unless the operator opened them
    (`SGTM_OPEN_READS=true`, for a trusted network): then anyone may read, and only writes need a token."""
    if settings.open_reads:
        return "anonymous"
    return require_token(settings, credentials)


def get_streams(request: Request) -> EventStreams:
    return request.app.state.streams  # type: ignore[no-any-return]


async def stream_slot(job_id: str, request: Request, principal: Annotated[str, Depends(require_reader)],
                      streams: Annotated[EventStreams, Depends(get_streams)]) -> StreamSlot:
    """Admit one event stream of an existing job: the reader first, then the caps, then the id. The stream releases the
    slot when it ends. The job is looked up with a session of its own, returned at once (not a per-request session,
    which a stream would keep checked out for its whole life)."""
    if principal == "anonymous":  # open reads: the per-client cap applies per address
        principal = f"anonymous@{request.client.host if request.client else '?'}"
    slot = streams.admit(principal)
    try:  # a whole id or a unique prefix (api/ids.py)
        slot.job_id = await streams.read(lambda session: find_by_id(session, Job, job_id, what="job").id)
    except BaseException:
        slot.release()
        raise
    return slot


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
EnqueuerDep = Annotated[Enqueuer, Depends(get_enqueuer)]
AuthDep = Annotated[str, Depends(require_token)]
#: On every /api/v1 router: reads are authenticated by default (see require_reader).
READ_AUTH = [Depends(require_reader)]
StreamsDep = Annotated[EventStreams, Depends(get_streams)]
AdmittedStream = Annotated[StreamSlot, Depends(stream_slot)]
