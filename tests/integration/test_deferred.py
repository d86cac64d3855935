"""The deferred manager against the real RabbitMQ, in a thread of the test process.

No database is involved: notifications are published straight to ``<prefix>.work.deferred``
and a tap consumes the work queues, recording when each notification arrived. RabbitMQ is
required: without it the fixtures fail (they never skip).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest

from deferred.heap import Arrivals, DeferredHeap, from_us, notification, to_us
from deferred.manager import Manager, main
from tests.conftest import delete_broker_objects, make_config
from tests.deferred_jobs import percentile
from tomqueue.config import LEVELS, Config
from tomqueue.errors import ConfigError
from tomqueue.message import Notification
from tomqueue.topology import Topology
from tomqueue.transport.amqp import declare_deferred, declare_work, properties

NAMED = "reports"
LEVEL_OF = {-10: "high", 0: "normal", 1: "low", 10: "bulk"}


def utc(seconds_from_now: float) -> datetime:
    return datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=seconds_from_now)


def ts(naive_utc: datetime) -> float:
    return naive_utc.replace(tzinfo=UTC).timestamp()


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


# --- broker helpers ----------------------------------------------------------------------


def open_channel(config: Config) -> tuple[pika.BlockingConnection, Any]:
    assert config.amqp_url
    connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    return connection, connection.channel()


def publish_notes(config: Config, notes: Sequence[Notification], confirm: bool = True) -> None:
    """Publish notifications to the deferred exchange the way enqueue does."""
    topology = Topology.of(config)
    connection, channel = open_channel(config)
    try:
        declare_deferred(channel, topology)
        if confirm:
            channel.confirm_delivery()
        for note in notes:
            level = config.level_for(note.priority)
            channel.basic_publish(
                topology.deferred_exchange, "", note.encode(), properties(note, level), True
            )
        channel.queue_declare(topology.deferred_queue, passive=True)  # a round trip: synced
    finally:
        connection.close()


def publish_raw(config: Config, body: bytes, headers: dict[str, Any] | None = None) -> None:
    topology = Topology.of(config)
    connection, channel = open_channel(config)
    try:
        declare_deferred(channel, topology)
        channel.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2, headers=headers, message_id="raw")
        channel.basic_publish(topology.deferred_exchange, "", body, props, mandatory=True)
    finally:
        connection.close()


def ready_count(config: Config, queue: str) -> int:
    """Ready messages in a queue; -1 while it does not exist."""
    connection, channel = open_channel(config)
    try:
        return int(channel.queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return -1
    finally:
        if connection.is_open:
            connection.close()


class Tap:
    """Consumes the work queues of some queue sets; records (time, routing key, body, headers)."""

    def __init__(self, config: Config, queue_sets: Sequence[str | None] = (None,)) -> None:
        topology = Topology.of(config)
        self.connection, self.channel = open_channel(config)
        self.arrivals: list[tuple[float, str, bytes, dict[str, Any]]] = []
        self.ahead = config.release_lead
        for queue in queue_sets:
            declare_work(self.channel, topology, queue)
            for level in LEVELS:
                self.channel.basic_consume(
                    topology.queue_name(queue, level), self._on_message, auto_ack=True
                )

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.arrivals.append((time.time(), method.routing_key, body, dict(props.headers or {})))

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.connection.process_data_events(time_limit=min(left, 0.05))

    def wait(self, count: int, timeout: float) -> list[tuple[float, str, bytes, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.05)
        assert len(self.arrivals) >= count, f"{len(self.arrivals)} of {count} arrived"
        return self.arrivals

    def lateness_ms(self) -> list[float]:
        """How long after its release time (``release_ahead`` before its ``run_at``) each
        job arrived."""
        out = []
        for arrived, _key, body, _headers in self.arrivals:
            run_at = datetime.fromisoformat(json.loads(body)["run_at"]).timestamp()
            out.append((arrived - run_at + self.ahead) * 1000)
        return out

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class Running:
    """A Manager serving in a background thread of the test process."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        kwargs.setdefault("stats_interval", 1.0)
        self.manager = Manager(config, **kwargs)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="deferred-manager", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.manager.run()
        except BaseException as exc:
            self.error = exc

    def wait_holding(self, count: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.manager.held_count() >= count, timeout, f"{count} held")

    def stop(self) -> None:
        self.manager.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the manager did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Config]:
    """The test configuration; ``indirect`` parametrization sets ``release_ahead``."""
    config = make_config("sqlite", "amqp", tmp_path)
    ahead = getattr(request, "param", None)
    if ahead is not None:
        config = config.replace(release_ahead=ahead)
    yield config
    delete_broker_objects(config, (NAMED,))


@pytest.fixture
def start(config: Config) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def starter(**kwargs: Any) -> Running:
        running.append(Running(config, **kwargs))
        return running[-1]

    yield starter
    for one in running:
        one.stop()


@pytest.fixture
def tap(config: Config) -> Iterator[Tap]:
    tap = Tap(config, (None, NAMED))
    yield tap
    tap.close()


def notes_due(count: int, first: float, spread: float, **fields: Any) -> list[Notification]:
    return [
        Notification(1000 + i, 1, utc(first + spread * i / max(count, 1)), kind="t:Job", **fields)
        for i in range(count)
    ]


# --- the heap's entries -----------------------------------------------------------------


def test_entries_rebuild_the_notification_exactly_and_stay_small() -> None:
    heap = DeferredHeap()
    note = Notification(42, 7, datetime(2031, 5, 6, 7, 8, 9, 123456), -5, "mail", "app:Mailer")
    heap.push(note, 3)
    [entry] = heap.take_all()
    assert notification(entry) == note
    assert from_us(to_us(note.run_at)) == note.run_at
    for i in range(1000):
        heap.push(note, 100 + i)
    assert len({id(e[5]) for e in heap.take_all()}) == 1, "meta tuples are shared"
    size = sys.getsizeof(entry) + sum(sys.getsizeof(v) for v in entry[:5]) + 8  # + list slot
    # ~240 (the rank is a shared small int); bench/deferred_memory.py measures
    assert size <= 300, f"{size} bytes per entry"


def test_heap_orders_by_run_at_and_takes_old_tags() -> None:
    heap = DeferredHeap()
    times = [utc(random.uniform(-5, 5)) for _ in range(200)]
    for tag, when in enumerate(times, start=1):
        heap.push(Notification(tag, 1, when), tag)
    old = heap.take_tags_up_to(50)
    assert sorted(e[2] for e in old) == list(range(1, 51))
    due = heap.pop_due(to_us(utc(0)), 10_000)
    assert [e[0] for e in due] == sorted(e[0] for e in due)
    assert all(e[0] > to_us(utc(-0.1)) for e in heap.take_all())
    arrivals = Arrivals(granularity=1.0)
    for tag, now in ((1, 0.0), (2, 0.5), (3, 1.2), (4, 2.5)):
        arrivals.note(tag, now)
    assert arrivals.pop_older_than(1.0) == 2
    assert arrivals.oldest() == 1.2


# --- releasing due jobs -------------------------------------------------------------------


RELEASE_AHEAD = pytest.mark.parametrize(
    "config", [0.0, None], indirect=True, ids=["at-run_at", "release_ahead"]
)


@RELEASE_AHEAD
def test_due_notifications_reach_their_queue_in_order_and_are_acked(
    config: Config, start: Callable[..., Running], tap: Tap
) -> None:
    running = start(refresh_interval=60)
    notes = []
    for i, priority in enumerate([-10, 0, 1, 10] * 5):
        queue = NAMED if i % 5 == 0 else None
        notes.append(Notification(500 + i, 3, utc(1.0 + 0.03 * i), priority, queue, "t:Job"))
    publish_notes(config, random.sample(notes, len(notes)))
    arrivals = tap.wait(len(notes), timeout=10)
    by_id = {n.job_id: n for n in notes}
    assert [json.loads(a[2])["delayed_job_id"] for a in arrivals] == [n.job_id for n in notes]
    for arrived, key, body, headers in arrivals:
        note = by_id[json.loads(body)["delayed_job_id"]]
        assert body == note.encode()
        assert arrived >= ts(note.run_at) - tap.ahead, "published before it was due"
        assert key == f"{note.queue or 'balance'}.{LEVEL_OF[note.priority]}"
        assert headers["priority_level"] == LEVEL_OF[note.priority]
    wait_for(lambda: running.manager.held_count() == 0, 5, "acks of the published deliveries")
    running.stop()
    assert ready_count(config, Topology.of(config).deferred_queue) == 0, "not acked: requeued"


@RELEASE_AHEAD
def test_due_jobs_are_released_within_milliseconds(
    config: Config, start: Callable[..., Running], tap: Tap
) -> None:
    running = start(refresh_interval=60)
    notes = notes_due(200, first=1.5, spread=1.0)
    publish_notes(config, notes)
    running.wait_holding(200, timeout=1.4)
    tap.wait(200, timeout=10)
    late = tap.lateness_ms()
    p50, p99 = percentile(late, 0.5), percentile(late, 0.99)
    print(
        f"\nrelease lateness over 200 jobs: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"max {max(late):.1f} ms, min {min(late):.2f} ms"
    )
    assert min(late) >= 0
    assert p50 <= 10 and p99 <= 50


def test_five_thousand_due_in_the_same_instant_are_released_quickly(
    config: Config, start: Callable[..., Running], tap: Tap
) -> None:
    running = start(refresh_interval=60)
    due = utc(6.0)
    notes = [Notification(10_000 + i, 1, due, 0, None, "t:Burst") for i in range(5000)]
    publish_notes(config, notes, confirm=False)
    running.wait_holding(5000, timeout=6)
    arrivals = tap.wait(5000, timeout=20)
    spent = max(a[0] for a in arrivals) - ts(due)
    print(
        f"\n5,000 due at once: all released {spent * 1000:.0f} ms after run_at "
        f"({5000 / spent:.0f}/s)"
    )
    assert min(a[0] for a in arrivals) >= ts(due) - tap.ahead
    assert len({a[2] for a in arrivals}) == 5000
    assert spent < 5.0


# --- bad input ------------------------------------------------------------------------------


def test_malformed_messages_are_logged_and_dropped(
    config: Config, start: Callable[..., Running], tap: Tap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deferred")
    running = start(refresh_interval=60)
    good = json.loads(Notification(7, 1, utc(0.5)).encode())
    bad: list[tuple[bytes, dict[str, Any] | None]] = [
        (b"not json at all", None),
        (b"\xff\xfe\x00 binary", None),
        (b"[1, 2, 3]", None),
        (json.dumps({**good, "delayed_job_id": -4}).encode(), None),
        (json.dumps({**good, "run_at": "yesterday"}).encode(), None),
        (json.dumps(good).encode(), {"queue": "no spaces allowed"}),
        (json.dumps(good).encode(), {"queue": 12}),
        (b"{" + b" " * 5000 + b"}", None),
    ]
    for body, headers in bad:
        publish_raw(config, body, headers)
    publish_notes(config, [Notification(8, 1, utc(1.0))])
    arrivals = tap.wait(1, timeout=10)
    assert json.loads(arrivals[0][2])["delayed_job_id"] == 8
    wait_for(lambda: running.manager.counters["dropped"] == len(bad), 5, "drops")
    dropped = [r for r in caplog.records if getattr(r, "action", "") == "malformed_message"]
    assert len(dropped) == len(bad)
    assert "not json at all" in caplog.text and "sweeper" in caplog.text
    running.stop()
    assert ready_count(config, Topology.of(config).deferred_queue) == 0


def test_refuses_to_start_on_a_deferred_queue_of_another_type(
    config: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    connection, channel = open_channel(config)
    name = Topology.of(config).deferred_queue
    channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    connection.close()
    with pytest.raises(ConfigError, match=name):
        Manager(config).run()
    monkeypatch.setenv("TOMQUEUE_AMQP_URL", str(config.amqp_url))
    monkeypatch.setenv("TOMQUEUE_PREFIX", config.prefix)
    monkeypatch.setenv("TOMQUEUE_DATABASE_URL", config.database_url)
    assert main([]) == 2
    assert name in capsys.readouterr().err


def test_options_are_validated(
    config: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TOMQUEUE_AMQP_URL", "amqp://guest:s3cret@127.0.0.1:1/%2F")
    assert main(["--refresh-interval", "0.2"]) == 2
    assert main(["--refresh-interval", "1800"]) == 2
    monkeypatch.setenv("TOMQUEUE_DEFERRED_REFRESH", "soon")
    assert main([]) == 2
    monkeypatch.setenv("TOMQUEUE_DEFERRED_REFRESH", "120")
    monkeypatch.setenv("TOMQUEUE_AMQP_URL", "")
    assert main([]) == 2
    assert main(["--help"]) == 0
    err = capsys.readouterr().err
    assert "TOMQUEUE_DEFERRED_REFRESH" in err and "refresh-interval" in err
    assert "TOMQUEUE_AMQP_URL" in err and "s3cret" not in err
    with pytest.raises(ConfigError, match="refresh_interval"):
        Manager(config, refresh_interval=0)


# --- consumer_timeout, broker faults ---------------------------------------------------------


def test_old_deliveries_are_refreshed_through_the_deferred_exchange(
    config: Config, start: Callable[..., Running], tap: Tap
) -> None:
    running = start(refresh_interval=1.0)
    notes = notes_due(40, first=4.0, spread=0.4)
    publish_notes(config, notes)
    running.wait_holding(40)
    oldest_age = 0.0
    while time.time() < ts(notes[0].run_at) - tap.ahead - 0.05:
        oldest = running.manager.holding.arrivals.oldest()
        if oldest is not None:
            oldest_age = max(oldest_age, time.monotonic() - oldest)
        tap.pump(0.02)
    assert tap.arrivals == [], "a refresh went through the work queues"
    assert oldest_age <= 1.0, f"a delivery was held {oldest_age:.2f}s"
    assert running.manager.counters["refreshed"] >= 40 * 3
    tap.wait(40, timeout=5)
    tap.pump(0.5)
    assert sorted(json.loads(a[2])["delayed_job_id"] for a in tap.arrivals) == [
        n.job_id for n in notes
    ], "every job once"
    assert min(tap.lateness_ms()) >= 0


def close_connection_named(name: str) -> None:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    pids = [line.split("\t")[0] for line in out.splitlines() if f'"{name}"' in line]
    assert len(pids) == 1, f"connection {name!r} not found exactly once: {pids}"
    subprocess.run(
        ["rabbitmqctl", "-q", "close_connection", pids[0], "test: closing the manager"],
        capture_output=True,
        timeout=30,
        check=True,
    )


def test_recovers_when_the_broker_closes_its_connection(
    config: Config, start: Callable[..., Running], tap: Tap
) -> None:
    running = start(refresh_interval=60)
    notes = notes_due(100, first=6.0, spread=0.5)
    publish_notes(config, notes)
    running.wait_holding(100)
    close_connection_named(f"tomqueue-deferred {socket.gethostname()} pid:{os.getpid()}")
    wait_for(lambda: running.manager.counters["reconnects"] == 1, 10, "a reconnect")
    running.wait_holding(100)
    time.sleep(0.3)
    assert running.manager.held_count() == 100, "held twice after the redelivery"
    tap.wait(100, timeout=15)
    tap.pump(0.3)
    assert sorted(json.loads(a[2])["delayed_job_id"] for a in tap.arrivals) == [
        n.job_id for n in notes
    ]
    assert min(tap.lateness_ms()) >= 0


def test_republishes_what_it_held_when_the_queue_is_deleted(
    config: Config, start: Callable[..., Running], tap: Tap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deferred")
    running = start(refresh_interval=60)
    notes = notes_due(50, first=4.0, spread=0.5)
    publish_notes(config, notes)
    running.wait_holding(50)
    connection, channel = open_channel(config)
    channel.queue_delete(Topology.of(config).deferred_queue)
    connection.close()
    wait_for(lambda: running.manager.counters["reconnects"] == 1, 10, "a new session")
    running.wait_holding(50)
    assert "re-published 50 held job(s), 0 failed" in caplog.text
    tap.wait(50, timeout=10)
    tap.pump(0.3)
    assert len(tap.arrivals) == 50 and min(tap.lateness_ms()) >= 0


def test_stop_releases_held_jobs_and_reports_status(
    config: Config, start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deferred")
    running = start(refresh_interval=60, stats_interval=0.2)
    notes = notes_due(30, first=60, spread=1)
    publish_notes(config, notes)
    running.wait_holding(30)
    assert running.manager.next_due() == notes[0].run_at
    wait_for(lambda: "holding 30 job(s)" in caplog.text, 3, "a statistics line")
    stats = [r for r in caplog.records if getattr(r, "action", "") == "deferred_stats"]
    assert stats[-1].held == 30  # type: ignore[attr-defined]
    running.stop()
    assert "released 30 held job(s)" in caplog.text
    wait_for(lambda: ready_count(config, Topology.of(config).deferred_queue) == 30, 5, "requeued")


def test_an_unroutable_publish_is_retried_not_lost(
    config: Config, start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deferred")
    running = start(refresh_interval=60)
    topology = Topology.of(config)
    first = Tap(config)
    publish_notes(config, [Notification(1, 1, utc(0.3))])
    first.wait(1, timeout=5)  # the manager has declared the default queue set by now
    first.close()
    connection, channel = open_channel(config)
    for level in LEVELS:
        channel.queue_delete(topology.queue_name(None, level))
    connection.close()
    publish_notes(config, [Notification(2, 1, utc(0.5))])
    wait_for(lambda: running.manager.counters["reconnects"] == 1, 10, "a new session")
    normal = topology.queue_name(None, "normal")
    wait_for(lambda: ready_count(config, normal) == 1, 10, "the job in its re-declared queue")
    assert "returned as unroutable" in caplog.text
    wait_for(lambda: running.manager.held_count() == 0, 5, "the ack")


def test_a_traceparent_survives_the_manager(
    config: Config, start: Callable[..., Running], tap: Tap
) -> None:
    """OpenTelemetry's context crosses the deferred queue: released notifications carry
    the traceparent they were held with (and those without one, none)."""
    traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    start(refresh_interval=60)
    notes = [
        Notification(700, 1, utc(0.5), 0, None, "t:Job", traced),
        Notification(701, 1, utc(0.5), 0, None, "t:Job"),
    ]
    publish_notes(config, notes)
    arrivals = tap.wait(2, timeout=10)
    carried = {
        json.loads(body)["delayed_job_id"]: h.get("traceparent") for _t, _k, body, h in arrivals
    }
    assert carried == {700: traced, 701: None}


def test_a_queue_set_is_declared_when_its_first_job_arrives(
    config: Config, start: Callable[..., Running]
) -> None:
    """Not when the job is due: releasing it then costs no declaration round trips."""
    queue = Topology.of(config).queue_name(NAMED, "normal")
    assert ready_count(config, queue) == -1
    running = start(refresh_interval=600)
    publish_notes(config, [Notification(7, 1, utc(3600), 0, NAMED, "t:Job")])
    running.wait_holding(1)
    wait_for(lambda: ready_count(config, queue) == 0, 5, f"{queue} declared")
    assert running.manager.held_count() == 1  # still held: an hour ahead
