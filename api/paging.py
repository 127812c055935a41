"""Keyset pages of the newest-first lists (jobs, sweeps): the opaque `next_cursor` a page hands out and the `cursor`
query parameter that asks for the page after it.

A cursor is the last row's creation time and id, so a page never repeats or skips a row that was there when the
previous page was read, however many rows arrive in between."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Annotated, Protocol

from fastapi import Query

from api.errors import InvalidRequest, Problem
from api.schemas import CURSOR_PATTERN, CURSOR_RULE, is_uuid

CursorQuery = Annotated[str | None, Query(max_length=200, pattern=CURSOR_PATTERN,
                                          description="`next_cursor` of the previous page")]


class Row(Protocol):
    id: str
    created_at: dt.datetime


def encode_cursor(last: Row) -> str:
    return base64.urlsafe_b64encode(f"{last.created_at.isoformat()}|{last.id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """(creation time, id) of the row the cursor's page ended with; 422 for anything this API did not issue."""
    try:
        created, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        when = dt.datetime.fromisoformat(created)
        if when.tzinfo is None or not is_uuid(row_id):
            raise ValueError("not a cursor")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest([Problem.at(("cursor",), CURSOR_RULE, cursor).nested(("query",), label="")]) from None
    return when, row_id
