"""events.jsonl tailing (the engine's reader, which the supervisor follows its child with) and progress throttling."""

from __future__ import annotations

import json
from pathlib import Path

from sgtm_engine.folders import EventTail
from workers.events import ProgressBuffer


def test_tail_reads_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"type": "progress", "step": 1}) + "\n")  # an earlier attempt's event
    tail = EventTail(path, from_end=True)
    assert tail.read() == []
    with path.open("a") as f:
        f.write(json.dumps({"type": "progress", "step": 2}) + "\n" + '{"type": "eval", "st')
    assert tail.read() == [{"type": "progress", "step": 2}]
    with path.open("a") as f:
        f.write('ep": 3}\nnot json\n[1, 2]\n')
    assert tail.read() == [{"type": "eval", "step": 3}]
    assert tail.skipped == 2


def test_missing_file_is_no_events(tmp_path: Path) -> None:
    assert EventTail(tmp_path / "absent.jsonl").read() == []


def test_progress_is_throttled_but_urgent_events_are_not() -> None:
    buffer = ProgressBuffer(interval_s=10)
    buffer.add({"type": "progress", "step": 1, "total": 9, "metrics": {"train/loss": 3.0}})
    assert buffer.due(now=0.0)  # the first write is due at once
    buffer.take(now=0.0)
    for step in (2, 3, 4):
        buffer.add({"type": "progress", "step": step, "total": 9, "metrics": {"train/loss": 3.0 - step / 10}})
    assert not buffer.due(now=1.0)
    assert buffer.due(now=11.0)
    buffer.add({"type": "checkpoint", "step": 4, "path": "/x"})
    assert buffer.due(now=1.0)  # urgent
    events = buffer.take(now=1.0)
    assert [e["type"] for e in events] == ["progress", "checkpoint"] and events[0]["step"] == 4  # collapsed
    assert (buffer.step, buffer.total, buffer.metrics) == (4, 9, {"train/loss": 2.6})


def test_non_finite_metrics_become_strings() -> None:
    buffer = ProgressBuffer(interval_s=0)
    buffer.add({"type": "eval", "metrics": {"a": float("nan"), "b": float("inf"), "c": 1.0}})
    assert buffer.metrics == {"a": "nan", "b": "inf", "c": 1.0}
