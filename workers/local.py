"""The embedded executor (`python -m workers.local`, started by `sgtm serve`): the same supervisor, no broker.

It polls the ledger for ready jobs and supervises them one at a time; between jobs it runs the reaper. One executor
per data root (a file lock): so at start-up every `running` job is an orphan of a previous run — it is requeued
and resumes from its checkpoint. SIGTERM/SIGINT stop the current engine child cleanly (SIGTERM, checkpoint) and
requeue its job for the next start. With `--stdin-lifeline` (how `sgtm serve` starts it) it stops the same way
when its stdin reaches end of file: `sgtm serve` holds the pipe's other end, so its death, however it dies, stops us
rather than leaving us to run on unseen.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import threading
import time
from types import FrameType

from api.config import Settings
from api.db import jobs as repo
from api.db.session import session_scope
from api.liveness import write_executor_heartbeat
from api.queue import NoopEnqueuer
from sgtm_engine.lifeline import watch_stdin
from workers.context import WorkerContext, build_worker_context
from workers.reaper import reap

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, settings: Settings, *, stop: threading.Event | None = None):
        self.stop = stop or threading.Event()
        self.context: WorkerContext = build_worker_context(settings, enqueuer=NoopEnqueuer(), shutdown=self.stop)

    def recover(self) -> None:
        """Requeue what a previous executor left running (it is gone: we hold the data root's lock)."""
        ctx = self.context
        report = reap(settings=ctx.settings, factory=ctx.factory, enqueuer=ctx.enqueuer, run_store=ctx.run_store,
                      stale_after_s=-1.0)
        if report.requeued or report.cancelled or report.failed:
            log.info("recovered orphans: requeued %s, cancelled %s, failed %s", report.requeued, report.cancelled,
                     report.failed)

    def run_once(self) -> bool:
        """Supervise the oldest ready job, if any. Returns whether one ran."""
        ctx = self.context
        with session_scope(ctx.factory) as session:
            ready = repo.ready_jobs(session, limit=1)
            job_id = ready[0].id if ready else None
        if job_id is None:
            return False
        ctx.supervisor.run(job_id)
        return True

    def run_forever(self) -> None:
        self.recover()
        last_reap = time.monotonic()
        while not self.stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # noqa: BLE001 - the job row already records it; keep serving the others
                log.exception("job supervision failed")
                ran = True
            if time.monotonic() - last_reap > self.context.settings.reap_interval_s:
                ctx = self.context
                reap(settings=ctx.settings, factory=ctx.factory, enqueuer=ctx.enqueuer, run_store=ctx.run_store)
                last_reap = time.monotonic()
            if not ran:
                self.stop.wait(self.context.settings.local_poll_interval_s)


def hold_data_root(settings: Settings) -> int:
    """An exclusive lock on `<data_root>/executor.lock` for the life of the process; exits if another holds it."""
    settings.data_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.data_root / "executor.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another executor is running on {settings.data_root}") from None
    return fd


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.local", description=__doc__.splitlines()[0])
    parser.add_argument("--stdin-lifeline", action="store_true",
                        help="stop when stdin reaches end of file (the process that started us is gone)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    lock = hold_data_root(settings)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("executor: %s received; stopping after the current job checkpoints", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if args.stdin_lifeline:
        watch_stdin(lambda: _orphaned(stop))
    threading.Thread(target=_heartbeat, args=(settings, stop), daemon=True).start()
    try:
        LocalExecutor(settings, stop=stop).run_forever()
    finally:
        os.close(lock)


def _heartbeat(settings: Settings, stop: threading.Event) -> None:
    """Tell the API (`/ready`) that jobs are being run; a thread of its own, so a long job does not silence it."""
    while True:
        try:
            write_executor_heartbeat(settings.data_root)
        except OSError as e:  # a full disk: /ready reports the disk, and the heartbeat resumes when it clears
            log.warning("executor heartbeat not written (%s)", e)
        if stop.wait(settings.heartbeat_interval_s):
            return


def _orphaned(stop: threading.Event) -> None:
    log.warning("executor: stdin closed, the process that started us is gone; stopping")
    stop.set()


if __name__ == "__main__":
    main()
