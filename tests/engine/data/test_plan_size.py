"""A plan is generated as it is read, never stored whole: a huge step count costs no memory up front."""

from __future__ import annotations

import time
import tracemalloc

from tests.engine.data.test_schedule import _plan


def test_a_trillion_step_plan_builds_at_once_in_constant_memory() -> None:
    tracemalloc.start()
    started = time.perf_counter()
    plan = _plan(steps=10**12)
    first = [plan[i] for i in range(5000)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(plan) == 10**12 and time.perf_counter() - started < 5
    assert peak < 20 * 2**20  # one schedule epoch (1000 entries), not 10^12
    assert first == list(_plan(steps=5000))  # the same entries as a short plan of the same seed


def test_reading_backwards_regenerates_the_same_entries() -> None:
    plan = _plan(steps=3000)
    forward = [plan[i] for i in range(3000)]
    assert plan[1234] == forward[1234] and plan[0] == forward[0] and plan[2999] == forward[2999]
