"""The request guard, an ASGI middleware that checks a request body before anything else reads it, and the
security headers every response carries.

It runs before routing, authentication and JSON parsing, so an oversized or hostile body costs the server no more
than its first `max_body_bytes`:
- a body over `max_body_bytes` (announced by Content-Length, or counted as it streams in) is a 413;
- JSON nested deeper than `max_json_depth` is a 422 (deep nesting exhausts the recursion of the parsers and
  serializers downstream);
- a string holding a lone UTF-16 surrogate (`"\\ud800"`, valid JSON but not text) is a 422 naming its field: it
  could be stored nowhere and echoed back to no one.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_depth: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        content_type = headers.get(b"content-type", b"").lower()
        if body and (not content_type or b"json" in content_type):
            problem = json_problem(bytes(body), self.max_json_depth)
            if problem is not None:
                await _send_json(send, 422, {"detail": [problem]})
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _send_json(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes "
                                               f"(SGTM_MAX_BODY_BYTES); send a smaller spec"})


class SecurityHeaders:
    """Headers every response carries: no MIME sniffing, no framing, no referrer leaks, no caching of API answers
    by shared caches (they hold specs and metrics)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"no-referrer"), (b"cross-origin-opener-policy", b"same-origin")]

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.HEADERS if k not in present]
                if b"cache-control" not in present and scope["path"].startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def json_problem(body: bytes, max_depth: int) -> dict[str, Any] | None:
    """A validation problem (FastAPI's shape) for JSON too deep or holding a lone surrogate; None when neither (or
    when it is not JSON at all: the route's own parser reports that)."""
    try:
        document = json.loads(body)
    except RecursionError:
        return _too_deep(max_depth)
    except ValueError:
        return None
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ("body",))]
    while stack:
        value, loc = stack.pop()
        if len(loc) - 1 > max_depth:
            return _too_deep(max_depth)
        if isinstance(value, str) and _has_surrogate(value):
            return {"type": "string_unicode", "loc": list(loc), "input": None,
                    "msg": f"{_dotted(loc)}: holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text; "
                           f"send valid Unicode"}
        if isinstance(value, dict):
            for key, item in value.items():
                if _has_surrogate(key):
                    return {"type": "string_unicode", "loc": list(loc), "input": None,
                            "msg": f"{_dotted(loc)}: a key holds a lone UTF-16 surrogate (e.g. \\ud800), which is "
                                   f"not text; send valid Unicode"}
                stack.append((item, (*loc, key)))
        elif isinstance(value, list):
            stack.extend((item, (*loc, i)) for i, item in enumerate(value))
    return None


def _too_deep(max_depth: int) -> dict[str, Any]:
    return {"type": "json_too_deep", "loc": ["body"], "input": None,
            "msg": f"body: JSON nested deeper than {max_depth} levels (SGTM_MAX_JSON_DEPTH); a spec needs a few"}


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc[1:]) or "body"


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
