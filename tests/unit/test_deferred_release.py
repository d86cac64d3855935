"""The deferred manager's release timing (issue 3, req. 3): its I/O wait ends a little
before the next release time (pika's wait ends on a whole millisecond, up to 1 ms late) and
it sleeps the rest, so a job is published on time: ``release_ahead`` before its ``run_at``
(the worker starts it at its ``run_at``), never earlier; at its ``run_at`` exactly with
``release_ahead=0``."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from deferred import holding
from deferred.heap import to_us
from deferred.holding import Holding
from tomqueue.config import Config
from tomqueue.message import Notification


class FakePublisher:
    in_flight = 0
    timeout = 5.0

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []  # (exchange, when in µs)

    def send(self, exchange: str, key: str, note: Notification, level: str, tag: int) -> None:
        self.sent.append((exchange, holding.now_us()))

    def take_confirmed(self) -> list[int]:
        return []

    def take_failures(self) -> list[tuple[int, str]]:
        return []

    def overdue(self, now: float) -> bool:
        return False


AHEAD = [0.0, Config().release_ahead]


def make_holding(ahead: float) -> tuple[Holding, Any]:
    config = Config(
        database_url="sqlite://", amqp_url="amqp://guest:guest@localhost/", release_ahead=ahead
    )
    held = Holding(config, refresh_interval=600, window=1000, counters=Counter())
    session = SimpleNamespace(
        publisher=FakePublisher(), ensure_queue_set=lambda queue: None, ack=lambda tags: None
    )
    return held, session


def due_in(seconds: float) -> datetime:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).replace(tzinfo=None)


@pytest.mark.parametrize("ahead", AHEAD)
def test_the_io_wait_ends_just_before_the_next_release_time(ahead: float) -> None:
    held, session = make_holding(ahead)
    held.heap.push(Notification(1, 1, due_in(0.05 + ahead), 0, None, "t:Job"), 1)
    wait = held.idle_time(session, next_stats=time.monotonic() + 60)
    assert 0.05 - holding.WAKE_EARLY - 0.01 < wait <= 0.05 - holding.WAKE_EARLY


@pytest.mark.parametrize("ahead", AHEAD)
def test_a_job_due_within_the_early_wake_is_published_on_time_not_before(ahead: float) -> None:
    held, session = make_holding(ahead)
    run_at = due_in(ahead + holding.WAKE_EARLY * 0.9)
    held.heap.push(Notification(1, 1, run_at, 0, None, "t:Job"), 1)
    held.release(session)
    [(exchange, sent_us)] = session.publisher.sent
    assert exchange == held.topology.work_exchange
    release_us = to_us(run_at) - round(ahead * 1_000_000)
    assert 0 <= sent_us - release_us < 1_000  # on time: within a millisecond


@pytest.mark.parametrize("ahead", AHEAD)
def test_a_job_due_later_is_left_for_a_later_turn(ahead: float) -> None:
    held, session = make_holding(ahead)
    held.heap.push(Notification(1, 1, due_in(ahead + 0.2), 0, None, "t:Job"), 1)
    started = time.monotonic()
    held.release(session)
    assert session.publisher.sent == [] and time.monotonic() - started < 0.05


def test_a_job_is_never_released_earlier_than_a_worker_would_take_it() -> None:
    """A worker defers again a job that arrives more than ``run_at_tolerance`` early."""
    config = Config(
        database_url="sqlite://",
        amqp_url="amqp://guest:guest@localhost/",
        release_ahead=0.05,
        run_at_tolerance=0.01,
    )
    held = Holding(config, refresh_interval=600, window=1000, counters=Counter())
    assert held.ahead_us == 10_000
