"""The engine's `result.json`: what a finished stage produced. Its presence in a job's workdir means the stage
finished (the engine writes it atomically, last), which is how the supervisor and the reaper recover a result whose
final state never reached the ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when it is missing or not a complete JSON object."""
    try:
        # NaN/Infinity become strings: JSON columns (PostgreSQL) cannot store them as numbers
        data = json.loads(path.read_text(), parse_constant=str)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data
