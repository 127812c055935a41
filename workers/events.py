"""Reading the child's `events.jsonl` incrementally, and throttling what reaches the ledger.

The child appends one JSON object per line. A line may be half-written when we read, so an unterminated tail is
kept for the next read. Lines that are not JSON objects are skipped (and counted), never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Events that always reach the ledger at once (a few per stage); `progress` is throttled to one write per interval.
URGENT_TYPES = frozenset({"started", "phase", "eval", "checkpoint", "finished"})


class EventTail:
    """Follows a JSON-lines file from a given offset (the file's size at spawn: earlier attempts' events are old)."""

    def __init__(self, path: Path, *, from_end: bool = True):
        self.path = path
        self.offset = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""
        self.skipped = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                events.append(event)
            else:
                self.skipped += 1
                log.warning("skipping a malformed line in %s", self.path)
        return events


class ProgressBuffer:
    """Collects events between two ledger writes: the latest step/total/metrics, all urgent events, and only the
    latest `progress` event (a thousand progress lines become one row)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.step: int | None = None
        self.total: int | None = None
        self.metrics: dict[str, Any] = {}
        self._events: list[dict[str, Any]] = []
        self._urgent = False
        self._last_write = float("-inf")

    def add(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type", "progress"))
        if isinstance(event.get("step"), int):
            self.step = event["step"]
        if isinstance(event.get("total"), int):
            self.total = event["total"]
        if isinstance(event.get("metrics"), dict):
            self.metrics.update(_finite(event["metrics"]))
        compact = _finite(event)
        if kind == "progress" and self._events and self._events[-1].get("type") == "progress":
            self._events[-1] = compact
        else:
            self._events.append(compact)
        self._urgent = self._urgent or kind in URGENT_TYPES

    def due(self, now: float | None = None, *, force: bool = False) -> bool:
        if not self._events:
            return False
        now = time.monotonic() if now is None else now
        return force or self._urgent or now - self._last_write >= self.interval_s

    def take(self, now: float | None = None) -> list[dict[str, Any]]:
        events, self._events, self._urgent = self._events, [], False
        self._last_write = time.monotonic() if now is None else now
        return events


def _finite(data: dict[str, Any]) -> dict[str, Any]:
    """JSON columns cannot hold NaN/Infinity (PostgreSQL rejects them): keep them as strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[str(key)] = str(value)
        elif isinstance(value, dict):
            out[str(key)] = _finite(value)
        else:
            out[str(key)] = value
    return out
