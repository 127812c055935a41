"""Ids in URLs: a whole id, or a unique prefix of at least 8 hex characters (what people copy from `sgtm jobs`).

Choices made here:
- A prefix is what a whole id starts with: 8 lower-case hex characters, then up to 28 more hex characters or dashes
  (upper case is read as lower). Anything else that is not a whole UUID is unknown (404) and never reaches the
  database.
- One match resolves; none is 404; several are 422 naming the path parameter, the prefix and the ids it matches (the
  fix: a longer prefix).
"""

from __future__ import annotations

import re
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import Job, Pipeline, Sweep
from api.errors import InvalidRequest, NotFound, Problem
from api.schemas import is_uuid

PREFIX_PATTERN = re.compile(r"^[0-9a-f]{8}[0-9a-f-]{0,28}$")
Row = TypeVar("Row", Job, Pipeline, Sweep)
_SHOWN = 5  # matching ids named in an ambiguity error


def find_by_id(session: Session, table: type[Row], raw: str, *, what: str) -> Row:
    """The row of `table` whose id is `raw` or starts with it (see the module doc); `what` names the thing and its
    path parameter in errors ('job' -> `job_id`)."""
    given = raw.lower()
    if is_uuid(given):
        row = session.get(table, given)
    elif PREFIX_PATTERN.fullmatch(given):
        ids = list(session.scalars(select(table.id).where(table.id.startswith(given, autoescape=True))
                                   .order_by(table.id).limit(_SHOWN + 1)))
        if len(ids) > 1:
            shown = ", ".join(ids[:_SHOWN]) + (", …" if len(ids) > _SHOWN else "")
            raise InvalidRequest([Problem(("path", f"{what}_id"), f"{what}_id={raw!r}: this prefix matches several "
                                          f"{what}s ({shown}); give more of the id", raw)])
        row = session.get(table, ids[0]) if ids else None
    else:
        row = None
    if row is None:
        raise NotFound(f"{what} {raw[:64]!r} does not exist")
    return row
