"""The engine child's stdin lifeline: when the process that started it dies (here: kill -9), the child stops at a step
boundary with a checkpoint, or at the end of its grace period when no boundary comes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.workers.test_supervisor import FAKE_ENGINE

#: A parent that starts the fake engine as the supervisor does (`workers.child.Child`), says its pid, and waits to die.
PARENT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from workers.child import Child

    workdir, engine, grace = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    argv = [sys.executable, engine, "run-stage", "--kind", "train", "--spec", str(workdir / "spec.json"),
            "--workdir", str(workdir), "--stdin-lifeline", grace]
    child = Child(argv, cwd=workdir, log_path=workdir / "child.log", env=dict(os.environ))
    print(child.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead for our purposes
    except (ProcessLookupError, FileNotFoundError):
        return False


def _orphan(tmp_path: Path, fake: dict, grace_s: float, after_steps: int) -> tuple[int, float]:
    """Start the parent, wait for the child's progress past `after_steps`, check that it is still running, kill -9 the
    parent; (child pid, the kill's time)."""
    (tmp_path / "spec.json").write_text(json.dumps({"fake": fake}))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), FAKE_ENGINE, str(grace_s)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while _read(tmp_path / "events.jsonl").count('"progress"') < after_steps:
        assert time.monotonic() < deadline, _read(tmp_path / "child.log")
        time.sleep(0.05)
    assert _alive(child_pid), "the child stopped while its parent was alive"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return child_pid, time.monotonic()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_dead(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"child {pid} still running {timeout} s after its parent died"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_orphaned_child_checkpoints_at_the_next_step_and_exits(tmp_path: Path) -> None:
    child_pid, killed = _orphan(tmp_path, {"steps": 10_000, "sleep": 0.05, "checkpoint_every": 10_000}, grace_s=60,
                                after_steps=20)
    _wait_dead(child_pid, 10)
    assert time.monotonic() - killed < 5  # a step boundary, not the 60 s grace
    steps = [json.loads(line)["step"] for line in _read(tmp_path / "events.jsonl").splitlines()]
    assert list((tmp_path / "checkpoints").glob("step-*.ck")), "stopped without a checkpoint"
    assert max(steps) < 10_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_orphaned_child_without_a_step_boundary_exits_after_the_grace(tmp_path: Path) -> None:
    child_pid, killed = _orphan(tmp_path, {"steps": 3, "sleep": 0.0, "checkpoint_every": 1000, "hang_at": 1},
                                grace_s=1.0, after_steps=1)
    _wait_dead(child_pid, 10)
    assert 0.9 < time.monotonic() - killed < 8
    assert not list((tmp_path / "checkpoints").glob("step-*.ck"))  # it never reached a boundary
