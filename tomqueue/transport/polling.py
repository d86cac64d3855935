"""The broker-less transport: workers poll the database (development mode and fallback).

There is nothing to publish (the row itself is the notification), so ``publish`` only wakes
a local poller. ``poll`` asks for due, unlocked, unfailed jobs, most urgent first, and turns
them into deliveries that go through the same worker stack as broker messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, or_, select

from tomqueue.config import Config
from tomqueue.db import db_now, get_engine
from tomqueue.leases import lock_is_free
from tomqueue.message import Notification
from tomqueue.schema import Job
from tomqueue.transport.base import Delivery, Publisher

_wakers: set[threading.Event] = set()
_wakers_lock = threading.Lock()


class NullPublisher:
    """Publishing without a broker: wake pollers in this process, nothing else."""

    def publish(self, notes: Sequence[Notification]) -> None:
        if notes:
            with _wakers_lock:
                for event in _wakers:
                    event.set()

    def close(self) -> None:
        pass


def due_jobs_query(
    config: Config,
    now: datetime,
    queues: Sequence[str | None],
    priority_range: tuple[int | None, int | None],
) -> Select[int, int, datetime, int, str | None]:
    """Due, unfailed jobs that are unlocked or whose lock expired."""
    query = select(Job.id, Job.version, Job.run_at, Job.priority, Job.queue).where(
        Job.failed_at.is_(None),
        Job.run_at <= now + timedelta(seconds=config.run_at_tolerance),
        lock_is_free(now, config),
    )
    if queues:
        names = [q for q in queues if q and q != config.default_queue]
        wants_default = any(q is None or q == config.default_queue for q in queues)
        conditions: list[ColumnElement[bool]] = [Job.queue.in_(names)] if names else []
        if wants_default:
            conditions += [Job.queue.is_(None), Job.queue == config.default_queue]
        query = query.where(or_(*conditions))
    low, high = priority_range
    if low is not None:
        query = query.where(Job.priority >= low)
    if high is not None:
        query = query.where(Job.priority <= high)
    return query.order_by(Job.priority, Job.run_at, Job.id)


class PollingConsumer:
    def __init__(
        self,
        config: Config,
        queues: Sequence[str | None],
        priority_range: tuple[int | None, int | None] = (None, None),
        publisher: Publisher | None = None,
    ) -> None:
        """``queues``: Delayed::Job queue names (None: the default queue); empty: every
        queue (``work_off``). ``publisher``: where follow-up notifications go (by default
        nowhere but this process's pollers)."""
        self.config = config
        self.queues = list(queues)
        self._publisher = publisher
        self.priority_range = priority_range
        self._engine = get_engine(config)
        self._wake = threading.Event()
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()
        self._next_poll = 0.0
        self._drained = False

    def start(self) -> None:
        with _wakers_lock:
            _wakers.add(self._wake)

    def poll(self, timeout: float, capacity: int) -> list[Delivery]:
        now = time.monotonic()
        if capacity <= 0 or now < self._next_poll:
            wait = timeout if capacity <= 0 else min(timeout, self._next_poll - now)
            if self._wake.wait(max(0.0, wait)):
                self._wake.clear()
                self._next_poll = 0.0
            return []
        found = self.fetch(capacity)
        self._drained = not found
        if len(found) < capacity:  # nothing more right now: sleep like Delayed::Job
            self._next_poll = time.monotonic() + self.config.sleep_delay
        return found

    def fetch(self, capacity: int) -> list[Delivery]:
        with self._lock:
            skip = set(self._in_flight)
        with self._engine.connect() as conn:
            now = db_now(conn)
            query = due_jobs_query(
                self.config,
                now,
                self.queues,
                self.priority_range,
            )
            if skip:
                query = query.where(Job.id.not_in(skip))
            rows = conn.execute(query.limit(capacity)).all()
        out = []
        for job_id, version, run_at, priority, queue in rows:
            note = Notification(job_id, version, run_at, priority, queue)
            level = self.config.level_for(priority)
            out.append(
                Delivery(
                    body=note.encode(),
                    level=level,
                    headers=note.headers(level),
                    tag=job_id,
                    received_at=time.monotonic(),
                )
            )
            with self._lock:
                self._in_flight.add(job_id)
        return out

    def take_above(self, level: str, limit: int) -> list[Delivery]:
        return []  # the poll query is already ordered by priority

    def is_drained(self) -> bool:
        return self._drained and not self._in_flight

    def ack(self, delivery: Delivery) -> None:
        if delivery.claim_ack():
            with self._lock:
                self._in_flight.discard(delivery.tag)

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self.ack(delivery)

    def requeue(self, delivery: Delivery) -> None:
        self.ack(delivery)
        self._wake.set()

    def publish(self, notes: Sequence[Notification]) -> None:
        if notes:
            if self._publisher is not None:
                self._publisher.publish(notes)
            self._next_poll = 0.0
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        with _wakers_lock:
            _wakers.discard(self._wake)
