"""The worker's dispatch step: the most urgent deliveries go to the free job places, and
messages more urgent than the least urgent job about to start are fetched first."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from tomqueue.config import Config
from tomqueue.transport.base import Delivery
from tomqueue.worker.process import LEASE_LOST_HOLD, POLL_WAIT, Worker


def delivery(level: str, n: int) -> Delivery:
    return Delivery(f"{level}-{n}".encode(), level, received_at=time.monotonic() + n)


@dataclass
class FakeConsumer:
    waiting: list[Delivery] = field(default_factory=list)
    asked: list[tuple[str, int]] = field(default_factory=list)

    def take_above(self, level: str, limit: int) -> list[Delivery]:
        self.asked.append((level, limit))
        rank = ("high", "normal", "low", "bulk").index(level)
        more = [d for d in self.waiting if ("high", "normal", "low", "bulk").index(d.level) < rank]
        taken = more[:limit]
        self.waiting = [d for d in self.waiting if d not in taken]
        return taken

    def requeue(self, delivery: Delivery) -> None:
        raise AssertionError("nothing is stale here")


@dataclass
class FakePipeline:
    places: int
    started: list[bytes] = field(default_factory=list)

    def free(self) -> int:
        return self.places - len(self.started)

    def submit(self, deliveries: list[Delivery]) -> None:
        self.started += [d.body for d in deliveries]


def worker(buffer: list[Delivery], consumer: FakeConsumer, places: int) -> Worker:
    w = Worker.__new__(Worker)  # only what _dispatch touches
    w.config = Config()
    w.consumer = consumer  # type: ignore[assignment]
    w.pipeline = FakePipeline(places)  # type: ignore[assignment]
    w.ctx = SimpleNamespace(lease_valid=lambda: True)  # type: ignore[assignment]
    w._buffer = buffer
    return w


def test_more_urgent_waiting_messages_start_before_the_buffered_ones() -> None:
    consumer = FakeConsumer([delivery("high", 1), delivery("normal", 2)])
    w = worker([delivery("bulk", 3), delivery("low", 4), delivery("bulk", 5)], consumer, 3)
    w._dispatch()
    # the least urgent job about to start was bulk: everything more urgent was asked for
    assert consumer.asked == [("bulk", 3)]
    assert w.pipeline.started == [b"high-1", b"normal-2", b"low-4"]  # type: ignore[attr-defined]
    assert [d.body for d in w._buffer] == [b"bulk-3", b"bulk-5"]


def test_only_levels_above_the_least_urgent_job_starting_are_asked_for() -> None:
    consumer = FakeConsumer([delivery("low", 1)])
    w = worker([delivery("normal", 2), delivery("bulk", 3)], consumer, 1)
    w._dispatch()
    assert consumer.asked == [("normal", 1)]  # one place: the normal job is what starts
    assert w.pipeline.started == [b"normal-2"]  # type: ignore[attr-defined]
    assert [d.body for d in consumer.waiting] == [b"low-1"]


def test_nothing_is_asked_when_only_high_jobs_start() -> None:
    consumer = FakeConsumer([delivery("high", 9)])
    w = worker([delivery("high", 1), delivery("high", 2), delivery("bulk", 3)], consumer, 2)
    w._dispatch()
    assert consumer.asked == []
    assert w.pipeline.started == [b"high-1", b"high-2"]  # type: ignore[attr-defined]


@dataclass
class GivingBack(FakeConsumer):
    given_back: list[bytes] = field(default_factory=list)

    def requeue(self, delivery: Delivery) -> None:
        self.given_back.append(delivery.body)


def held_since(seconds: float, name: str) -> Delivery:
    return Delivery(name.encode(), "normal", received_at=time.monotonic() - seconds)


def test_a_worker_that_lost_its_lease_gives_deliveries_back_after_a_second() -> None:
    """Cut off from the database, a worker may lock nothing: what it holds goes back to the
    broker after ``LEASE_LOST_HOLD`` (not ``delivery_hold_limit``, minutes), for workers
    that can reach the database; nothing starts meanwhile."""
    consumer = GivingBack()
    w = worker([held_since(LEASE_LOST_HOLD + 0.5, "old"), held_since(0.0, "new")], consumer, 4)
    w.ctx.lease_valid = lambda: False
    w._dispatch()
    assert consumer.given_back == [b"old"]
    assert [d.body for d in w._buffer] == [b"new"]
    assert w.pipeline.started == []  # type: ignore[attr-defined]
    w.ctx.lease_valid = lambda: True  # renewed: held deliveries start, none is given back
    w._buffer.append(held_since(LEASE_LOST_HOLD + 0.5, "older"))
    w._dispatch()
    assert consumer.given_back == [b"old"]
    assert sorted(w.pipeline.started) == [b"new", b"older"]  # type: ignore[attr-defined]


def test_a_worker_that_lost_its_lease_waits_for_the_broker_instead_of_spinning() -> None:
    """Buffered deliveries that cannot start must not turn the dispatch loop into a busy
    loop (a zero-second poll) while the lease is lost."""
    w = worker([held_since(0.0, "a")], FakeConsumer(), 4)
    assert w._poll_wait(free=4) == 0.0  # they can start: take more at once
    assert w._poll_wait(free=0) == POLL_WAIT  # no place free
    w.ctx.lease_valid = lambda: False
    assert w._poll_wait(free=4) == POLL_WAIT
    w._buffer.clear()
    w.ctx.lease_valid = lambda: True
    assert w._poll_wait(free=4) == POLL_WAIT
