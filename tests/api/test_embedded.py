"""`sgtm serve`'s executor keeper: a real `python -m workers.local` killed with SIGKILL is started again and /ready
comes back; a command that keeps dying is given up on after `max_restarts` exits; one that exits cleanly (a Ctrl-C
reaches it too) stays stopped, and so does one whose stdin lifeline closes; `stop` ends the executor."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from api.config import Settings
from api.embedded import ExecutorKeeper
from api.liveness import EXECUTOR_HEARTBEAT, executor_check
from tests.integration.compose import wait_until


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_a_killed_executor_is_started_again(settings: Settings) -> None:
    env = {**os.environ, "SGTM_DATABASE_URL": settings.ledger_url, "SGTM_DATA_ROOT": str(settings.data_root),
           "SGTM_TRACKING": "false", "SGTM_HEARTBEAT_INTERVAL_S": "0.2"}
    keeper = ExecutorKeeper([sys.executable, "-m", "workers.local", "--stdin-lifeline"], env)
    heartbeat = settings.data_root / EXECUTOR_HEARTBEAT
    keeper.start()
    try:
        wait_until(lambda: executor_check(settings) == "ok", 60, "the executor's heartbeat")
        first = keeper.pid
        assert first is not None and json.loads(heartbeat.read_text())["pid"] == first
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: keeper.pid not in (None, first), 30, "a new executor")
        second = keeper.pid
        wait_until(lambda: json.loads(heartbeat.read_text())["pid"] == second and executor_check(settings) == "ok",
               60, "the new executor's heartbeat")
        assert keeper.starts == 2 and not keeper.gave_up
    finally:
        keeper.stop(grace_s=20)
    assert keeper.pid is None
    time.sleep(1.0)  # a stopped keeper starts nothing
    assert keeper.starts == 2 and "gone" in executor_check(settings)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_the_executor_stops_when_its_lifeline_closes(settings: Settings) -> None:
    """`sgtm serve` dying (kill -9, OOM) closes the executor's stdin, as closing the keeper's end does here: the
    executor stops cleanly (exit code 0), which the keeper takes as asked for."""
    env = {**os.environ, "SGTM_DATABASE_URL": settings.ledger_url, "SGTM_DATA_ROOT": str(settings.data_root),
           "SGTM_TRACKING": "false", "SGTM_HEARTBEAT_INTERVAL_S": "0.2"}
    keeper = ExecutorKeeper([sys.executable, "-m", "workers.local", "--stdin-lifeline"], env, poll_s=0.05)
    keeper.start()
    try:
        wait_until(lambda: executor_check(settings) == "ok", 60, "the executor's heartbeat")
        proc = keeper._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        time.sleep(1.5)  # past the first restart's 1 s back-off
        assert keeper.starts == 1 and not keeper.gave_up
    finally:
        keeper.stop(grace_s=20)


def test_a_crash_loop_is_given_up_on(tmp_path: Path) -> None:
    keeper = ExecutorKeeper([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), max_restarts=2,
                            window_s=60, poll_s=0.05)
    keeper.start()
    try:
        wait_until(lambda: keeper.gave_up, 30, "the keeper to give up")
    finally:
        keeper.stop(grace_s=5)
    assert keeper.starts == 3  # the first start and two restarts (after 1 s, then 2 s)


def test_a_clean_exit_is_not_restarted() -> None:
    keeper = ExecutorKeeper([sys.executable, "-c", "pass"], dict(os.environ), poll_s=0.05)
    keeper.start()
    try:
        time.sleep(2.5)  # past the first restart's 1 s back-off
    finally:
        keeper.stop(grace_s=5)
    assert keeper.starts == 1 and not keeper.gave_up
