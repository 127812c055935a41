"""Domain errors and their HTTP mapping: 401, 404, 409, 422 with field paths, 503 for an unreachable ledger.

No handler ever returns a traceback. Validation problems use FastAPI's own shape
(`{"detail": [{"loc": [...], "msg": ..., "type": ..., "input": ...}]}`) so clients parse one format, and each `msg`
is a whole readable line that names its field (`kind: Field required`), as the engine's problems do.
"""

from __future__ import annotations

import enum
import logging
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.db.jobs import IllegalTransition, JobNotFound
from api.schemas import PATTERN_RULES
from sgtm_engine.config import did_you_mean, unknown_choice, unknown_key
from sgtm_engine.errors import Problem, is_huge_int, render_loc, render_value

log = logging.getLogger(__name__)

__all__ = ["Conflict", "InvalidRequest", "NotFound", "Problem", "Unauthorized", "Unavailable", "install_handlers"]


class InvalidRequest(Exception):
    """A body that parsed but does not describe a runnable job: a bad spec field, an unknown parent, … Its problems
    are located in the request (`("body", "stages", 0, "spec", "steps")`) and become 422 detail entries as they are:
    loc, msg (the whole readable line) and input (the offending value)."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(p.msg for p in problems))
        self.problems = problems


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class Unauthorized(Exception):
    pass


class Unavailable(Exception):
    """An optional part of the service (e.g. report rendering) is not installed or not reachable."""


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(InvalidRequest, _invalid)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(JobNotFound, _not_found)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(IllegalTransition, _conflict)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(Unavailable, _optional_unavailable)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(PoolTimeout, _unavailable)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)


async def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # an unparseable body (not UTF-8, not JSON): bad input, reported like the rest
        detail = [{"type": "json_invalid", "loc": ["body"], "input": None,
                   "msg": f"body: {exc.detail}; send a UTF-8 JSON object (Content-Type: application/json)"}]
        return JSONResponse({"detail": detail}, status_code=422)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequest)
    detail = [{"type": "value_error", "loc": list(p.loc), "msg": p.msg, "input": _jsonable(p.value)}
              for p in exc.problems]
    return JSONResponse({"detail": detail}, status_code=422)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    declared = _declared_types(request)
    detail, meant = [], set()
    for error in exc.errors():
        loc, msg = tuple(error.get("loc", ())), error.get("msg")
        if loc[:1] in (("body",), ("query",)) and declared.get(loc[0]) is not None:
            msg, guess = _engine_wording(declared[loc[0]], loc[1:], error)
            meant |= {loc[:-1] + (guess,)} if guess else set()
        if error.get("type") == "json_invalid":
            msg = f"body: {msg} at character {loc[-1]}; send a UTF-8 JSON object (Content-Type: application/json)"
        elif msg == error.get("msg") and render_loc(loc[1:]):  # pydantic's words name no field: say which
            msg = f"{render_loc(loc[1:])}: {msg}"
        detail.append({"type": error.get("type"), "loc": list(loc), "msg": _jsonable(msg),
                       "input": _jsonable(error.get("input"))})
    # `{"knd": "train"}`: the did-you-mean says it all; "kind: Field required" would be a false follow-on error
    detail = [d for d in detail if not (d["type"] == "missing" and tuple(d["loc"]) in meant)]
    return JSONResponse({"detail": detail}, status_code=422)


def _engine_wording(root: Any, path: tuple[Any, ...], error: Mapping[str, Any]) -> tuple[Any, str | None]:
    """An unknown key, enum value or malformed name in a request body or query worded as `sgtm run` words it in a
    recipe, with a did-you-mean; returns (message, the key it was probably meant as). Anything else keeps pydantic's
    message."""
    if error.get("type") == "extra_forbidden":
        owner = _annotation_at(root, path[:-1])
        if isinstance(owner, type) and issubclass(owner, BaseModel):
            name = getattr(owner, "noun", owner.__name__)
            return unknown_key(path[:-1], str(path[-1]), owner.model_fields, name).msg, \
                did_you_mean(str(path[-1]), owner.model_fields)
    field = _annotation_at(root, path)
    if error.get("type") == "enum" and isinstance(field, type) and issubclass(field, enum.Enum):
        return unknown_choice(path, error.get("input"), [m.value for m in field]).msg, None
    rule = PATTERN_RULES.get((error.get("ctx") or {}).get("pattern"))
    if error.get("type") == "string_pattern_mismatch" and rule:
        return Problem.at(path, rule, error.get("input")).msg, None
    return error.get("msg"), None


def _declared_types(request: Request) -> dict[str, Any]:
    """What the route declares: `body`, its body model (or None); `query`, {parameter: its type}."""
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    return {"body": model if isinstance(model, type) and issubclass(model, BaseModel) else None,
            "query": query_params(route)}


def query_params(route: Any) -> dict[str, Any]:
    """{name: type} of the query parameters a route takes, its own and its dependencies'."""
    found, todo = {}, [getattr(route, "dependant", None)]
    while todo:
        dependant = todo.pop()
        if dependant is not None:
            found |= {p.alias: p.field_info.annotation for p in dependant.query_params}
            todo += dependant.dependencies
    return found


def _annotation_at(tp: Any, path: tuple[Any, ...]) -> Any:
    """The type at `path` inside a body model or the query's {parameter: type} (through models, lists and dicts),
    or None."""
    for part in path:
        tp = _unwrapped(tp)
        if isinstance(tp, Mapping):
            tp = tp.get(str(part))
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            tp = field.annotation if field else None
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    return _unwrapped(tp)


def _unwrapped(tp: Any) -> Any:
    """`Annotated[X, ...]` and `X | None` as X."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _conflict(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _unauthorized(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


async def _optional_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("ledger unavailable: %s", exc.__class__.__name__)
    return JSONResponse({"detail": "the job ledger is unavailable; retry shortly"}, status_code=503,
                        headers={"Retry-After": "5"})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # A connection-level failure is an outage (503); anything else reaching here is a bug we log, not a traceback.
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return await _unavailable(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error; it has been logged"}, status_code=500)


#: An echoed input is cut to this many characters, list items or keys: a 422 names the bad value, it does not
#: mirror the request.
ECHO_LIMIT = 200


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/Infinity; echoing one raw would turn a 422 into a 500
    if isinstance(value, str):
        text = value if len(value) <= ECHO_LIMIT else f"{value[:ECHO_LIMIT]}… ({len(value)} characters)"
        return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate cannot be encoded
    if is_huge_int(value):
        return render_value(value)  # `1e308` parsed as a 309-digit integer: its magnitude, not its digits
    if value is None or isinstance(value, int | float | bool):
        return value
    if depth > 8:
        return "…"
    if isinstance(value, list | tuple):
        items = [_jsonable(v, depth + 1) for v in value[:ECHO_LIMIT // 10]]
        return items + [f"… ({len(value)} items)"] if len(value) > ECHO_LIMIT // 10 else items
    if isinstance(value, dict):
        pairs = list(value.items())[:ECHO_LIMIT // 10]
        out = {_jsonable(str(k)): _jsonable(v, depth + 1) for k, v in pairs}
        if len(value) > len(pairs):
            out["…"] = f"{len(value)} keys"
        return out
    return _jsonable(repr(value))
