"""Must-show 2: a ready ``high`` job runs before a ``normal`` one enqueued earlier.

One single-threaded worker, started after both jobs are enqueued, over the full matrix;
and the consumer's part in strict priority: messages more urgent than the job about to
start are fetched from the broker even when their level's prefetch window is full.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import tomqueue
from tests import ledger
from tests.conftest import (
    Stack,
    WorkerThread,
    declare_topology,
    job_count,
    on_stacks,
    publish_raw,
    queue_depth,
    run_worker,
    wait_until,
)
from tests.jobs import Record, Sleepy
from tomqueue.config import LEVELS, Config
from tomqueue.transport import amqp_consumer
from tomqueue.transport.amqp_consumer import AmqpConsumer
from tomqueue.transport.base import Delivery


def test_high_priority_job_runs_before_earlier_normal_job(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    assert config.level_for(-1) == "high" and config.level_for(0) == "normal"
    tomqueue.enqueue(Record(ledger_path, "normal-first"), priority=0)
    tomqueue.enqueue(Record(ledger_path, "normal-second"), priority=0)
    tomqueue.enqueue(Record(ledger_path, "high"), priority=-1)

    run_worker(config, threads=1)

    assert ledger.markers(ledger_path) == ["high", "normal-first", "normal-second"]
    assert job_count(config) == 0


def test_levels_run_most_urgent_first(stack: Stack, ledger_path: str) -> None:
    """bulk, low, normal, high enqueued in that order run as high, normal, low, bulk."""
    for priority, marker in ((10, "bulk"), (1, "low"), (0, "normal"), (-5, "high")):
        tomqueue.enqueue(Record(ledger_path, marker), priority=priority)

    run_worker(stack.config, threads=1)

    assert ledger.markers(ledger_path) == ["high", "normal", "low", "bulk"]
    assert job_count(stack.config) == 0


def test_high_job_overtakes_normal_jobs_already_buffered(stack: Stack, ledger_path: str) -> None:
    """While a single-threaded worker is busy and holds prefetched normal deliveries, a
    high job enqueued later still runs next."""
    config = stack.config
    tomqueue.enqueue(Sleepy(ledger_path, "busy", seconds=0.7), priority=0)
    for i in range(6):
        tomqueue.enqueue(Record(ledger_path, f"n{i}"), priority=0)
    worker = WorkerThread(config, threads=1).start()
    try:
        wait_until(lambda: ledger.counts(ledger_path, "start")["busy"], 20, "the busy job")
        tomqueue.enqueue(Record(ledger_path, "high"), priority=-1)
        wait_until(lambda: len(ledger.markers(ledger_path)) == 8, 20, "all jobs")
    finally:
        worker.stop()
        assert worker.join(20) == 0

    assert ledger.markers(ledger_path) == ["busy", "high"] + [f"n{i}" for i in range(6)]


def _bodies(deliveries: list[Delivery]) -> list[bytes]:
    return [d.body for d in deliveries]


@contextmanager
def window_full(config: Config) -> Iterator[tuple[AmqpConsumer, list[Delivery]]]:
    """A started consumer (a window of 3 per level) and the 3 high and 3 normal deliveries
    it holds, with high-4..high-6 still waiting in the broker."""
    declare_topology(config)
    for i in range(6):
        publish_raw(config, f"high-{i + 1}".encode(), routing_key="balance.high")
        publish_raw(config, f"normal-{i + 1}".encode())
    consumer = AmqpConsumer(config, [None], prefetch=1)  # window: 2 * 1 + read_ahead 1
    consumer.start()
    try:
        held: list[Delivery] = []
        wait_until(lambda: held.extend(consumer.poll(0.1, 0)) or len(held) == 6, 10, "6 held")
        assert sorted(_bodies(held)) == [
            f"{lv}-{i}".encode() for lv in LEVELS[:2] for i in (1, 2, 3)
        ]
        yield consumer, held
    finally:
        consumer.close()


@on_stacks(("sqlite", "amqp"))
def test_more_urgent_messages_beyond_the_window_are_fetched(stack: Stack) -> None:
    """Before a normal job starts, the highs the full window kept in the broker are taken."""
    config = stack.config.replace(read_ahead=1)
    with window_full(config) as (consumer, _):
        assert consumer.take_above("high", 10) == []  # nothing is more urgent than high
        fetched = consumer.take_above("normal", 2)
        assert _bodies(fetched) == [b"high-4", b"high-5"]  # no more than asked for
        fetched += consumer.take_above("normal", 10)
        assert _bodies(fetched) == [b"high-4", b"high-5", b"high-6"]
        assert {d.level for d in fetched} == {"high"}
        consumer.ack_many(fetched)
        consumer.poll(0.1, 0)  # the acks go out
        name = f"{config.prefix}.balance.high"
        wait_until(lambda: queue_depth(config, name)[0] == 0, 5, "high queue empty")


@on_stacks(("sqlite", "amqp"))
def test_a_more_urgent_queue_found_empty_rests(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue found empty is not asked again for READY_CHECK_INTERVAL: one basic.get per
    interval, not one per job started."""
    config = stack.config.replace(read_ahead=1)
    with window_full(config) as (consumer, _):
        assert len(consumer.take_above("normal", 10)) == 3  # and high is found empty
        publish_raw(config, b"high-7", routing_key="balance.high")  # the window is full
        monkeypatch.setattr(amqp_consumer, "READY_CHECK_INTERVAL", 3600.0)
        assert consumer.take_above("normal", 10) == []
        monkeypatch.setattr(amqp_consumer, "READY_CHECK_INTERVAL", 0.0)
        assert _bodies(consumer.take_above("normal", 10)) == [b"high-7"]


@on_stacks(("sqlite", "amqp"))
def test_a_resting_queue_is_asked_again_once_it_pushes_a_message(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst still being published: the more urgent queue was found empty a moment ago,
    but a message of it pushed to us shows it is filling again; it is asked at once."""
    config = stack.config.replace(read_ahead=1)
    monkeypatch.setattr(amqp_consumer, "READY_CHECK_INTERVAL", 3600.0)
    with window_full(config) as (consumer, pushed):
        fetched = consumer.take_above("normal", 10)
        assert _bodies(fetched) == [b"high-4", b"high-5", b"high-6"]  # high is found empty
        publish_raw(config, b"high-7", routing_key="balance.high")
        publish_raw(config, b"high-8", routing_key="balance.high")
        assert consumer.take_above("normal", 10) == []  # resting
        consumer.ack_many([d for d in pushed if d.body == b"high-1"])  # room in its window
        more: list[Delivery] = []
        wait_until(lambda: more.extend(consumer.poll(0.1, 0)) or more, 10, "high-7 pushed")
        assert _bodies(more) == [b"high-7"]
        assert _bodies(consumer.take_above("normal", 10)) == [b"high-8"]


@on_stacks(("sqlite", "amqp"))
def test_a_more_urgent_queue_with_room_in_its_window_is_not_asked(stack: Stack) -> None:
    """Its messages are pushed to us anyway: an ordinary dispatch costs no round trip."""
    config = stack.config.replace(read_ahead=1)
    declare_topology(config)
    publish_raw(config, b"high-1", routing_key="balance.high")
    publish_raw(config, b"normal-1")
    consumer = AmqpConsumer(config, [None], prefetch=1)  # a window of 3 per level
    consumer.start()
    try:
        held: list[Delivery] = []
        wait_until(lambda: held.extend(consumer.poll(0.1, 0)) or len(held) == 2, 10, "2 held")
        assert consumer._consume is not None

        def no_round_trip(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("basic.get on a queue whose window has room")

        consumer._consume.basic_get = no_round_trip  # type: ignore[method-assign]
        assert consumer.take_above("normal", 10) == []
    finally:
        consumer.close()
