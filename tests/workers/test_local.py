"""The embedded executor: orphan recovery at start-up, then the same supervisor over the ledger, no broker."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from api.config import Settings
from api.db import jobs as repo
from api.db.session import session_scope
from workers.local import LocalExecutor, hold_data_root

FAKE_ENGINE = str(Path(__file__).with_name("fake_engine.py"))


def _job(factory: sessionmaker[Session], **fake: object) -> str:
    with session_scope(factory) as s:
        return repo.create(s, kind="train", spec={"fake": fake}, spec_hash="b" * 64, method="sgtm", seed=0,
                           experiment="sgtm", queue="cpu", gpus=1, max_attempts=3, inputs={}).id


def test_executor_recovers_orphans_then_runs_ready_jobs(settings: Settings, factory: sessionmaker[Session]) -> None:
    s = settings.model_copy(update={"engine_command": [sys.executable, FAKE_ENGINE], "tracking": False})
    orphan, queued = _job(factory, steps=2), _job(factory, steps=2)
    parent_failed = _job(factory, exit_code=3)
    child = None
    with session_scope(factory) as session:
        repo.claim(session, job_id=orphan, owner="a-previous-serve")  # it died holding this one
        child = repo.create(session, kind="ablate", spec={}, spec_hash="c" * 64, method="sgtm", seed=0,
                            experiment="sgtm", queue="cpu", gpus=1, max_attempts=3,
                            inputs={"model": parent_failed}).id
    executor = LocalExecutor(s)
    executor.recover()
    with factory() as session:
        assert repo.get(session, job_id=orphan).status == "queued"  # type: ignore[union-attr]
    ran = 0
    while executor.run_once():
        ran += 1
    assert ran == 3
    with factory() as session:
        statuses = {j: repo.get(session, job_id=j).status for j in (orphan, queued, parent_failed, child)}  # type: ignore[union-attr]
    assert statuses == {orphan: "succeeded", queued: "succeeded", parent_failed: "failed", child: "failed"}


def test_one_executor_per_data_root(settings: Settings) -> None:
    fd = hold_data_root(settings)
    try:
        errors: list[BaseException] = []
        thread = threading.Thread(target=lambda: _try(settings, errors))
        thread.start()
        thread.join()
        # flock is per open file description: a second open in this process is refused too
        assert errors and "another executor" in str(errors[0])
    finally:
        import os

        os.close(fd)


def _try(settings: Settings, errors: list[BaseException]) -> None:
    try:
        hold_data_root(settings)
    except SystemExit as e:
        errors.append(e)
