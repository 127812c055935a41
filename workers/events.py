"""Throttling the child's events (read from its `events.jsonl` by `sgtm_engine.folders.EventTail`) on their way
to the ledger."""

from __future__ import annotations

import math
import time
from typing import Any

#: Events that always reach the ledger at once (a few per stage); `progress` is throttled to one write per interval.
URGENT_TYPES = frozenset({"started", "phase", "eval", "checkpoint", "finished"})


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
