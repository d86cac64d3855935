"""RabbitMQ transport over pika's BlockingConnection.

pika is not thread-safe. A ``Connection`` object is owned by one thread: for the worker it
is the main thread, which runs ``poll`` (pika I/O, heartbeats); job threads reach the
connection only through ``_call``, which schedules work on the owner thread with
``add_callback_threadsafe`` and waits for its result. So heartbeats flow while jobs run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    AMQPError,
    ChannelClosedByBroker,
    NackError,
    UnroutableError,
)

from tomqueue.config import LEVELS, Config, redact_url
from tomqueue.db import utcnow
from tomqueue.errors import BrokerUnavailable, ConfigError, PublishError
from tomqueue.message import CONTENT_TYPE, Notification
from tomqueue.topology import Topology
from tomqueue.transport.base import Delivery
from tomqueue.transport.pipelined import PipelinedPublisher

log = logging.getLogger("tomqueue.amqp")
T = TypeVar("T")

CLASSIC = {"x-queue-type": "classic"}
PIPELINE_WINDOW = 500  # unconfirmed publishes in flight at most
READY_CHECK_INTERVAL = 0.05  # seconds between two "more urgent messages waiting?" checks


def connect(config: Config, role: str) -> BlockingConnection:
    """Open a connection named after its role (visible in the management UI)."""
    assert config.amqp_url
    params = pika.URLParameters(config.amqp_url)
    if "heartbeat" not in config.amqp_url:
        params.heartbeat = 20
    if "blocked_connection_timeout" not in config.amqp_url:
        params.blocked_connection_timeout = 30
    params.client_properties = {
        "connection_name": f"tomqueue-{role} {socket.gethostname()} pid:{os.getpid()}"
    }
    try:
        return BlockingConnection(params)
    except AMQPError as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise BrokerUnavailable(
            f"cannot connect to the broker at {redact_url(config.amqp_url)}: {detail}"
        ) from None
    except OSError as exc:
        raise BrokerUnavailable(
            f"cannot connect to the broker at {redact_url(config.amqp_url)}: {exc}"
        ) from None


def _declare_queue(channel: BlockingChannel, name: str) -> Any:
    try:
        return channel.queue_declare(name, durable=True, arguments=CLASSIC)
    except ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise ConfigError(
                f"queue {name!r} exists with other arguments than a durable classic queue "
                f"({exc.reply_text}); delete it or use another prefix"
            ) from None
        raise


def declare_work(channel: BlockingChannel, topology: Topology, queue: str | None) -> None:
    """Declare the work exchange and a queue set (idempotent)."""
    channel.exchange_declare(topology.work_exchange, "topic", durable=True)
    for _level, name, key in topology.queues_of(queue):
        _declare_queue(channel, name)
        channel.queue_bind(name, topology.work_exchange, routing_key=key)


def declare_deferred(channel: BlockingChannel, topology: Topology) -> Any:
    channel.exchange_declare(topology.deferred_exchange, "fanout", durable=True)
    result = _declare_queue(channel, topology.deferred_queue)
    channel.queue_bind(topology.deferred_queue, topology.deferred_exchange)
    return result


def route(note: Notification, config: Config, topology: Topology) -> tuple[str, str, str]:
    """(exchange, routing key, level) for a notification: work if due, else deferred."""
    level = config.level_for(note.priority)
    if (note.run_at - utcnow()).total_seconds() > 0.0005:
        return topology.deferred_exchange, "", level
    return topology.work_exchange, topology.routing_key(note.queue, level), level


def properties(note: Notification, level: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        headers=note.headers(level),
        message_id=f"{note.job_id}:{note.version}",
    )


class ConfirmedChannel:
    """A channel in confirm mode that publishes notifications (owner thread only)."""

    def __init__(self, connection: BlockingConnection, config: Config) -> None:
        self.config = config
        self.topology = Topology.of(config)
        self.channel = connection.channel()
        self.channel.confirm_delivery()
        self.channel.exchange_declare(self.topology.work_exchange, "topic", durable=True)
        declare_deferred(self.channel, self.topology)
        self._declared: set[str] = set()

    def ensure_queue_set(self, queue: str | None) -> None:
        name = self.topology.queue_set(queue)
        if name not in self._declared:
            declare_work(self.channel, self.topology, queue)
            self._declared.add(name)

    def publish(self, notes: Sequence[Notification]) -> None:
        for note in notes:
            exchange, key, level = route(note, self.config, self.topology)
            if exchange == self.topology.work_exchange:
                self.ensure_queue_set(note.queue)
            try:
                self.channel.basic_publish(
                    exchange, key, note.encode(), properties(note, level), mandatory=True
                )
            except UnroutableError:
                raise PublishError(
                    f"job {note.job_id}: notification to {exchange!r} with key {key!r} "
                    "matched no queue"
                ) from None
            except NackError:
                raise PublishError(
                    f"job {note.job_id}: the broker refused the notification (nack)"
                ) from None


class AmqpPublisher:
    """Thread-safe publisher for enqueueing code: one connection, serialized by a lock."""

    def __init__(self, config: Config, role: str = "publisher") -> None:
        self.config = config
        self.role = role
        self._lock = threading.Lock()
        self._connection: BlockingConnection | None = None
        self._channel: ConfirmedChannel | None = None
        self._pipelined: PipelinedPublisher | None = None

    def publish(self, notes: Sequence[Notification]) -> None:
        if not notes:
            return
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._publish(notes)
                    return
                except (AMQPConnectionError, AMQPChannelError, OSError) as exc:
                    self._reset()
                    if attempt == 2:
                        raise PublishError(
                            f"publishing {len(notes)} notification(s) to "
                            f"{redact_url(self.config.amqp_url)} failed: {type(exc).__name__}"
                        ) from None
                except BrokerUnavailable as exc:
                    self._reset()
                    raise PublishError(str(exc)) from None
                except PublishError:
                    self._reset()  # a fresh channel: no stale confirms from this attempt
                    raise

    def _ensure(self) -> ConfirmedChannel:
        if self._connection is None or not self._connection.is_open or self._channel is None:
            self._reset()
            self._connection = connect(self.config, self.role)
            self._channel = ConfirmedChannel(self._connection, self.config)
            self._pipelined = PipelinedPublisher(self._connection, self.config.publish_timeout)
        else:
            self._connection.process_data_events(0)  # answer heartbeats, notice a close
        return self._channel

    def _publish(self, notes: Sequence[Notification]) -> None:
        channel = self._ensure()
        if len(notes) == 1:
            channel.publish(notes)
            return
        self._publish_pipelined(channel, notes)

    def _publish_pipelined(self, channel: ConfirmedChannel, notes: Sequence[Notification]) -> None:
        """Many notifications, many confirms in flight (3-5k/s instead of ~800/s); any
        nack, return or missing confirm fails the whole call (it is safe to repeat)."""
        assert self._connection is not None and self._pipelined is not None
        pipe = self._pipelined
        for i, note in enumerate(notes):
            exchange, key, level = route(note, self.config, channel.topology)
            if exchange == channel.topology.work_exchange:
                channel.ensure_queue_set(note.queue)
            pipe.send(exchange, key, note.encode(), properties(note, level), i)
            if pipe.in_flight >= PIPELINE_WINDOW:
                self._settle(pipe, PIPELINE_WINDOW // 2)
        self._settle(pipe, 0)

    def _settle(self, pipe: PipelinedPublisher, down_to: int) -> None:
        assert self._connection is not None
        while pipe.in_flight > down_to:
            self._connection.process_data_events(0.01)
            failures = pipe.take_failures()
            if failures:
                raise PublishError(f"{len(failures)} notification(s) failed: {failures[0]}")
            if pipe.overdue(time.monotonic()):
                raise PublishError("the broker did not confirm notifications in time")
            pipe.take_confirmed()

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        with self._lock:
            self._reset()


class AmqpConsumer:
    """The worker's side: consumes the queue sets it was given, one consumer per level."""

    def __init__(
        self,
        config: Config,
        queues: Sequence[str | None],
        levels: Sequence[str] = LEVELS,
        prefetch: int = 1,
    ) -> None:
        self.config = config
        self.topology = Topology.of(config)
        self.queue_sets = list(dict.fromkeys(queues or [None]))
        self.levels: tuple[str, ...] = tuple(lv for lv in LEVELS if lv in levels)
        # every job thread may be busy with one level while read_ahead more wait in buffer
        self.prefetch = min(65535, prefetch + config.read_ahead)
        self._owner = threading.get_ident()
        self._connection: BlockingConnection | None = None
        self._consume: BlockingChannel | None = None
        self._publish: ConfirmedChannel | None = None
        self._buffer: list[Delivery] = []
        self._generation = 0
        self._cancelled = False
        self._last_ready_check = 0.0
        self._acks: list[Delivery] = []
        self._acks_lock = threading.Lock()

    # --- owner thread ----------------------------------------------------------------

    def start(self) -> None:
        self._owner = threading.get_ident()
        self._connection = connect(self.config, "worker")
        self._generation += 1
        with self._acks_lock:
            self._acks = []  # tags of the old channel mean nothing on the new one
        self._publish = ConfirmedChannel(self._connection, self.config)
        self._consume = self._connection.channel()
        self._cancelled = False
        self._consume.add_on_cancel_callback(self._on_cancel)
        self._consume.basic_qos(prefetch_count=self.prefetch)
        for queue in self.queue_sets:
            declare_work(self._consume, self.topology, queue)
        for level in self.levels:  # most urgent first
            for queue in self.queue_sets:
                self._consume.basic_consume(
                    self.topology.queue_name(queue, level), self._on_message(level)
                )
        log.info(
            "consuming %s",
            ", ".join(
                self.topology.queue_name(q, lv) for lv in self.levels for q in self.queue_sets
            ),
        )

    def _on_message(self, level: str) -> Callable[..., None]:
        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            self._buffer.append(
                Delivery(
                    body=body,
                    level=level,
                    headers=dict(props.headers or {}),
                    tag=method.delivery_tag,
                    received_at=time.monotonic(),
                    redelivered=bool(method.redelivered),
                    generation=self._generation,
                )
            )

        return on_message

    def _on_cancel(self, _frame: Any) -> None:
        log.warning(
            "the broker cancelled a consumer (queue deleted?); reconnecting",
            extra={"action": "consumer_cancelled"},
        )
        self._cancelled = True

    def poll(self, timeout: float, capacity: int) -> list[Delivery]:
        assert self._connection is not None
        if self._cancelled:
            raise BrokerUnavailable("a consumer was cancelled by the broker")
        if not self._buffer:
            self._connection.process_data_events(time_limit=timeout)
        else:
            self._connection.process_data_events(0)
        out, self._buffer = self._buffer, []
        return out

    def has_ready_above(self, level: str) -> bool:
        """Asked before starting a less urgent job. Rate-limited: between checks, a more
        urgent message that becomes ready is pushed to our own consumer at once anyway."""
        assert self._publish is not None
        now = time.monotonic()
        if now - self._last_ready_check < READY_CHECK_INTERVAL:
            return False
        self._last_ready_check = now
        for higher in self.levels[: self.levels.index(level)]:
            for queue in self.queue_sets:
                ok = self._publish.channel.queue_declare(
                    self.topology.queue_name(queue, higher), passive=True
                )
                if ok.method.message_count:
                    return True
        return False

    def is_drained(self) -> bool:
        return not self._buffer and not any(
            self._publish is not None
            and self._publish.channel.queue_declare(
                self.topology.queue_name(q, lv), passive=True
            ).method.message_count
            for lv in self.levels
            for q in self.queue_sets
        )

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(AMQPError):
                connection.close()

    # --- any thread ------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], wait: bool = True) -> T | None:
        if threading.get_ident() == self._owner:
            return fn()
        connection = self._connection
        if connection is None or not connection.is_open:
            raise BrokerUnavailable("the worker's broker connection is closed")
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        connection.add_callback_threadsafe(run)
        return future.result(timeout=self.config.publish_timeout) if wait else None

    def ack(self, delivery: Delivery) -> None:
        """Sent asynchronously: nothing waits for an ack (a lost one means a redelivery,
        which the row's version and lock make harmless). Acks queue up and one wake-up of
        the connection's thread sends all that are waiting."""
        if delivery.claim_ack():
            with self._acks_lock:
                first = not self._acks
                self._acks.append(delivery)
            if first:
                try:
                    self._call(self._flush_acks, wait=False)
                except BrokerUnavailable:
                    with self._acks_lock:
                        self._acks = []  # the broker requeues them: redeliveries are harmless
                    raise

    def _flush_acks(self) -> None:
        """Send the queued acks. Through pika's asynchronous channel under the blocking one:
        ``BlockingChannel.basic_ack`` flushes the socket on every call; these go out
        together on the I/O loop's next pass."""
        with self._acks_lock:
            acks, self._acks = self._acks, []
        channel = self._consume
        if channel is None or not channel.is_open:
            return
        for delivery in acks:
            if delivery.generation == self._generation:
                channel._impl.basic_ack(delivery.tag)

    def _ack_now(self, delivery: Delivery) -> None:
        if (
            delivery.generation == self._generation
            and self._consume is not None
            and self._consume.is_open
        ):
            self._consume.basic_ack(delivery.tag)

    def ack_later(self, delivery: Delivery, after: float) -> None:
        def schedule() -> None:
            assert self._connection is not None
            self._connection.call_later(after, lambda: self._ack_if_pending(delivery))

        self._call(schedule, wait=False)

    def _ack_if_pending(self, delivery: Delivery) -> None:
        if delivery.claim_ack():
            log.info(
                "acknowledged the delivery of a long-running job early",
                extra={"action": "early_ack"},
            )
            self._ack_now(delivery)

    def requeue(self, delivery: Delivery) -> None:
        def nack() -> None:
            if delivery.generation == self._generation and self._consume is not None:
                self._consume.basic_nack(delivery.tag, requeue=True)

        if delivery.claim_ack():
            self._call(nack)

    def publish(self, notes: Sequence[Notification]) -> None:
        if notes:
            assert self._publish is not None
            publish = self._publish
            self._call(lambda: publish.publish(notes))

    def wake(self) -> None:
        connection = self._connection
        if connection is not None and connection.is_open:
            with contextlib.suppress(AMQPError):
                connection.add_callback_threadsafe(lambda: None)


def queue_depths(
    config: Config, queue_sets: Sequence[str | None]
) -> dict[tuple[str | None, str], int]:
    """Ready messages per (queue set, level), by passive declares; missing queues: 0."""
    topology = Topology.of(config)
    connection = connect(config, "inspect")
    depths: dict[tuple[str | None, str], int] = {}
    try:
        for queue in queue_sets:
            for level, name, _key in topology.queues_of(queue):
                channel = connection.channel()
                try:
                    ok = channel.queue_declare(name, passive=True)
                    depths[(queue, level)] = ok.method.message_count
                    channel.close()
                except ChannelClosedByBroker:  # 404: the queue does not exist
                    depths[(queue, level)] = 0
    finally:
        if connection.is_open:
            connection.close()
    return depths
