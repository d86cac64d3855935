"""What one manager holds during a broker session, and how it receives and releases it.

- Receive: decode, check the queue name can be routed, push on the heap, note the arrival.
  A malformed message is logged (what can be read of it) and acked.
- Release, each turn of the loop:
  1. deliveries older than 90 % of the refresh interval move to the outbox (refresh);
  2. due entries (most urgent level first, see ``heap``), then the outbox, are published
     with confirms in flight (up to a window): a due entry to ``<prefix>.work`` (its queue
     set declared when the first job naming it arrived), an entry not yet due (a refresh)
     to ``<prefix>.work.deferred``. An entry is due ``release_ahead`` (50 ms) before its
     ``run_at``: the worker locks it then and starts it at its ``run_at``, so the publish,
     the broker and the lock are not part of its lateness;
  3. confirmed publishes have their original delivery acked; a nack, a return or a missing
     confirm ends the session (``SessionLost``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Any

from deferred.heap import (
    RANK,
    RUN_AT,
    TAG,
    Arrivals,
    DeferredHeap,
    Entry,
    level_rank,
    notification,
)
from deferred.session import Session
from tomqueue.config import Config
from tomqueue.errors import TomQueueError
from tomqueue.message import decode
from tomqueue.topology import Topology
from tomqueue.transport.amqp import declare_deferred

log = logging.getLogger("deferred")

MAX_IDLE = 0.1  # longest single wait: bounds the reaction to a stop request
BATCH = 100  # publishes per turn: the socket is flushed between turns
WAKE_EARLY = 0.002  # the I/O wait ends this much before a due time, the rest is slept:
# pika's wait ends on a whole millisecond (epoll), up to 1 ms after the time asked for


class SessionLost(TomQueueError):
    """The broker session can no longer be trusted: open a new one."""


def now_us() -> int:
    return time.time_ns() // 1000


class Holding:
    def __init__(
        self, config: Config, refresh_interval: float, window: int, counters: Counter[str]
    ) -> None:
        self.config = config
        self.topology = Topology.of(config)
        self.window = window
        self.counters = counters
        self.heap = DeferredHeap(level_rank(config.priority_map))
        self.outbox: deque[Entry] = deque()
        self.arrivals = Arrivals(refresh_interval / 10)
        self.refresh_age = refresh_interval * 0.9
        self.cancelled = False
        self.seen_queues: set[str | None] = set()
        self.undeclared: set[str | None] = set()  # seen, not declared yet in this session
        self.ahead_us = round(config.release_lead * 1_000_000)

    def __len__(self) -> int:
        return len(self.heap) + len(self.outbox)

    def clear(self) -> None:
        self.heap.clear()
        self.outbox.clear()
        self.arrivals.clear()
        self.cancelled = False
        self.seen_queues.clear()  # a new session declares again what its deliveries name
        self.undeclared.clear()

    # --- receiving (pika dispatch callbacks) ---------------------------------------------

    def on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        tag = method.delivery_tag
        self.arrivals.note(tag, time.monotonic())
        try:
            note = decode(body, props.headers)
            self.topology.routing_key(note.queue, "normal")  # a queue name we can route
            self.heap.push(note, tag)
            if note.queue not in self.seen_queues:
                self.seen_queues.add(note.queue)
                self.undeclared.add(note.queue)
        except (TypeError, ValueError, OverflowError) as exc:  # MessageError, EnqueueError
            self.counters["dropped"] += 1
            log.warning(
                "dropping a malformed message from %s (message_id=%r, redelivered=%s, "
                "headers=%.300r, body=%.200r): %s; the sweeper recovers its job, if any",
                self.topology.deferred_queue,
                props.message_id,
                method.redelivered,
                props.headers,
                body,
                exc,
                extra={"action": "malformed_message", "delivery_tag": tag},
            )
            channel.basic_ack(tag)

    def on_cancel(self, _frame: Any) -> None:
        self.cancelled = True

    # --- releasing ----------------------------------------------------------------------

    def release(self, session: Session) -> None:
        """One turn: refresh old deliveries, publish what is due, settle confirms."""
        self.prepare(session)
        last_tag = self.arrivals.pop_older_than(time.monotonic() - self.refresh_age)
        if last_tag is not None:
            self.outbox.extend(self.heap.take_tags_up_to(last_tag))
        self.sleep_until_due()
        due_by = self.due_by()
        room = min(BATCH, self.window - session.publisher.in_flight)
        for entry in self.heap.pop_due(due_by, room):
            self.send(session, entry, due_by)
        room = min(BATCH, self.window - session.publisher.in_flight)
        while room > 0 and self.outbox:
            self.send(session, self.outbox.popleft(), due_by)
            room -= 1
        self.settle(session)

    def due_by(self) -> int:
        """Entries whose ``run_at`` is at or before this (microseconds) are due now."""
        return now_us() + self.ahead_us

    def next_release_us(self) -> int | None:
        """When the next entry held becomes due."""
        next_us = self.heap.next_due_us()
        return None if next_us is None else next_us - self.ahead_us

    def sleep_until_due(self) -> None:
        """The next entry is due within ``WAKE_EARLY``: sleep until it is, exactly."""
        next_us = self.next_release_us()
        if next_us is not None:
            early = (next_us - now_us()) / 1e6
            if 0 < early <= WAKE_EARLY:
                time.sleep(early)

    def prepare(self, session: Session) -> None:
        """Declare the queue sets of newly seen queue names while their jobs wait, so that
        releasing a due job costs no declaration round trips. One that cannot be declared
        is reported when its job is released (``send``)."""
        while self.undeclared:
            session.ensure_queue_set(self.undeclared.pop())

    def send(self, session: Session, entry: Entry, due_by: int, action: str = "") -> None:
        """Due: to the work exchange. Not due (refresh, salvage): to the deferred exchange."""
        note = notification(entry)
        level = self.config.level_for(note.priority)
        if entry[RUN_AT] > due_by:
            exchange, key = self.topology.deferred_exchange, ""
            action = action or "refreshed"
        else:
            reason = session.ensure_queue_set(note.queue)
            if reason is not None:
                self.counters["dropped"] += 1
                log.error(
                    "job %s: cannot declare the queue set of %r (%s); notification dropped, "
                    "the sweeper republishes it",
                    note.job_id,
                    note.queue,
                    reason,
                    extra={"action": "undeclarable_queue", "job_id": note.job_id},
                )
                session.ack([entry[TAG]])
                return
            exchange = self.topology.work_exchange
            key = self.topology.routing_key(note.queue, level)
            action = action or "published"
        session.publisher.send(exchange, key, note, level, entry[TAG])
        self.counters[action] += 1

    def settle(self, session: Session) -> None:
        """Ack the deliveries whose copies are confirmed; a failed publish ends the session."""
        publisher = session.publisher
        session.ack(publisher.take_confirmed())
        failures = publisher.take_failures()
        if failures:
            raise SessionLost(f"{len(failures)} publish(es) failed, first: {failures[0]}")
        if publisher.overdue(time.monotonic()):
            raise SessionLost(f"a publish was not confirmed within {publisher.timeout:g}s")

    def idle_time(self, session: Session, next_stats: float) -> float:
        """How long the loop may wait for I/O before something is due."""
        if session.publisher.in_flight >= self.window:
            return MAX_IDLE  # confirms wake the loop
        if self.outbox:
            return 0.0
        now = time.monotonic()
        limits = [MAX_IDLE, next_stats - now]
        next_us = self.next_release_us()
        if next_us is not None:
            limits.append(next_us / 1e6 - time.time() - WAKE_EARLY)
        oldest = self.arrivals.oldest()
        if oldest is not None:
            limits.append(oldest + self.refresh_age - now)
        return max(0.0, min(limits))

    def wait_confirms(self, session: Session, limit: float) -> None:
        deadline = time.monotonic() + limit
        while session.publisher.in_flight and time.monotonic() < deadline:
            if session.broken() is not None:
                return
            session.publisher.rearm()
            session.connection.process_data_events(0.05)

    def drain(self, session: Session, limit: float) -> None:
        """On stop: let confirms in flight arrive (bounded) and ack their deliveries."""
        self.wait_confirms(session, limit)
        if session.broken() is None:
            session.ack(session.publisher.take_confirmed())

    def salvage(self, session: Session) -> tuple[int, int]:
        """The consumer was cancelled: re-publish what is held to the re-declared queue.

        The old deliveries died with their queue; they are not acked (their tags are dead).
        If the queue was not deleted after all, the broker requeues them and the copies are
        harmless duplicates. Returns (re-published, failed)."""
        entries = [*self.heap.take_all(), *self.outbox]
        self.outbox.clear()
        declare_deferred(session.declarer.channel, self.topology)
        due_by = self.due_by()
        for entry in entries:
            if session.publisher.in_flight >= self.window:
                self.wait_confirms(session, self.config.publish_timeout)
            self.send(session, (entry[RUN_AT], entry[RANK], 0, *entry[3:]), due_by, "salvaged")
        self.wait_confirms(session, self.config.publish_timeout)
        failed = len(session.publisher.take_failures()) + session.publisher.in_flight
        session.publisher.take_confirmed()  # nothing to ack
        return len(entries) - failed, failed
