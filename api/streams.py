"""Event streams (`GET /jobs/{id}/events`) that cannot starve the API.

A stream is an async generator on the event loop: while it waits it holds no thread and no database connection.
One watcher task polls the ledger for every open stream at once (one query per interval, whatever the number of
streams) and wakes only the streams whose job has news; a woken stream reads its new events in a thread of a small
pool of its own, never in the request pool that serves every other route. Open streams are capped in total and per
principal (`event_streams_max`, `event_streams_per_client`); one more is a 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import Job, JobEvent
from api.db.status import TERMINAL_VALUES

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Watch:
    """What the watcher last saw of one job, and how many streams follow it."""

    streams: int = 0
    latest_event: int = 0
    finished: bool = False
    news: asyncio.Event = field(default_factory=asyncio.Event)


class StreamSlot:
    """A held stream slot. The stream releases it when it ends; should a stream never start (its client left
    between the headers and the first event), the slot is released when the request's objects are collected."""

    def __init__(self, streams: EventStreams, principal: str):
        self._finalizer = weakref.finalize(self, streams._release, principal)
        self.job_id = ""
        """The streamed job's whole id, once admitted (the request may name it by a prefix)."""

    def release(self) -> None:
        self._finalizer()  # runs once, however often it is called


class EventStreams:
    """The open streams of one app: admission (caps), the shared watcher, and the small pool for stream reads."""

    def __init__(self, factory: sessionmaker[Session], *, max_streams: int, per_client: int, poll_s: float,
                 read_threads: int = 4):
        self.factory = factory
        self.max_streams = max_streams
        self.per_client = per_client
        self.poll_s = poll_s
        self._read_threads = read_threads
        self._limiter: anyio.CapacityLimiter | None = None  # created on the event loop, at first use
        self._open: dict[str, int] = {}
        self._watches: dict[str, _Watch] = {}
        self._watcher: asyncio.Task[None] | None = None

    # -- admission ----------------------------------------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return sum(self._open.values())

    def admit(self, principal: str) -> StreamSlot:
        """One stream slot for `principal`, or a 429 when a cap is reached."""
        if self.open_streams >= self.max_streams:
            raise _too_many(f"the server has {self.max_streams} event streams open (SGTM_EVENT_STREAMS_MAX)")
        if self._open.get(principal, 0) >= self.per_client:
            raise _too_many(f"this token already has {self.per_client} event streams open "
                            f"(SGTM_EVENT_STREAMS_PER_CLIENT); close one or poll GET /api/v1/jobs/{{id}}")
        self._open[principal] = self._open.get(principal, 0) + 1
        return StreamSlot(self, principal)

    def _release(self, principal: str) -> None:
        self._open[principal] -= 1
        if not self._open[principal]:
            del self._open[principal]

    # -- reads --------------------------------------------------------------------------------------------------------

    async def read(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` with a short-lived session in the streams' own threads (not the request pool)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._read_threads)

        def call() -> T:
            with self.factory() as session:
                return fn(session)

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    # -- waiting for news ---------------------------------------------------------------------------------------------

    async def wait_for_news(self, job_id: str, *, after: int, timeout: float) -> None:
        """Return once the job has an event after `after` or has finished (or after `timeout` seconds)."""
        watch = self._watches.setdefault(job_id, _Watch(latest_event=after))
        watch.streams += 1
        self._ensure_watcher()
        try:
            with anyio.move_on_after(timeout):
                while watch.latest_event <= after and not watch.finished:
                    await watch.news.wait()
        finally:
            watch.streams -= 1
            if not watch.streams:
                self._watches.pop(job_id, None)

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_forever(), name="sgtm-event-watcher")

    async def _watch_forever(self) -> None:
        while self._watches:
            await asyncio.sleep(self.poll_s)
            job_ids = list(self._watches)
            try:
                latest, finished = await self.read(functools.partial(_job_news, job_ids=job_ids))
            except SQLAlchemyError as e:  # the ledger is down: streams keep waiting, the next poll retries
                log.warning("event watcher: ledger unavailable (%s)", e.__class__.__name__)
                continue
            for job_id in job_ids:
                watch = self._watches.get(job_id)
                if watch is None:
                    continue
                newest = latest.get(job_id, 0)
                if newest > watch.latest_event or job_id in finished:
                    watch.latest_event = max(watch.latest_event, newest)
                    watch.finished = job_id in finished
                    watch.news.set()
                    watch.news = asyncio.Event()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher


def _job_news(session: Session, *, job_ids: list[str]) -> tuple[dict[str, int], set[str]]:
    """The newest event id of each job and which of them have finished: two indexed queries for every stream."""
    latest = dict(session.execute(select(JobEvent.job_id, func.max(JobEvent.id))
                                  .where(JobEvent.job_id.in_(job_ids)).group_by(JobEvent.job_id)).all())
    finished = set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status.in_(TERMINAL_VALUES))))
    return latest, finished


def _too_many(detail: str) -> HTTPException:
    return HTTPException(status_code=429, detail=detail, headers={"Retry-After": "5"})
