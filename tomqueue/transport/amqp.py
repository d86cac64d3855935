"""RabbitMQ transport over pika's BlockingConnection: connections, declarations, routing,
confirmed publishing (``AmqpPublisher``). The worker's consumer is in ``amqp_consumer``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    ChannelClosedByBroker,
    ConnectionBlockedTimeout,
    NackError,
    UnroutableError,
)

from tomqueue.config import Config, redact_url
from tomqueue.db import utcnow
from tomqueue.errors import BrokerUnavailable, ConfigError, PublishError
from tomqueue.message import CONTENT_TYPE, Notification
from tomqueue.topology import Topology
from tomqueue.transport.pipelined import PipelinedPublisher

log = logging.getLogger("tomqueue.amqp")
T = TypeVar("T")

CLASSIC = {"x-queue-type": "classic"}
PIPELINE_WINDOW = 500  # unconfirmed publishes in flight at most
DUE_MARGIN = timedelta(microseconds=500)  # a job due this soon goes to work, not deferred


def connect(config: Config, role: str) -> BlockingConnection:
    """Open a connection named after its role (visible in the management UI)."""
    assert config.amqp_url
    params = pika.URLParameters(config.amqp_url)
    if "heartbeat" not in config.amqp_url:
        params.heartbeat = 20
    if "blocked_connection_timeout" not in config.amqp_url:
        # a broker that blocks publishers (disk or memory alarm) must not hold a caller that
        # waits for a confirm longer than it would wait for any other confirm
        params.blocked_connection_timeout = min(30.0, config.publish_timeout)
    params.client_properties = {
        "connection_name": f"tomqueue-{role} {socket.gethostname()} pid:{os.getpid()}"
    }
    try:
        return BlockingConnection(params)
    except Exception as exc:  # AMQPError, OSError, and pika's ValueError on a reset socket
        raise BrokerUnavailable(
            f"cannot connect to the broker at {redact_url(config.amqp_url)}: {error_text(exc)}"
        ) from None


def error_text(exc: BaseException) -> str:
    """An exception as a log line names it: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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


def route(
    note: Notification, config: Config, topology: Topology, now: datetime | None = None
) -> tuple[str, str, str]:
    """(exchange, routing key, level) for a notification: work if due, else deferred.
    ``now``: the clock, read once for a batch of notifications (default: read it now)."""
    level = config.level_for(note.priority)
    if note.run_at > (now or utcnow()) + DUE_MARGIN:
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
        self._declared: set[str | None] = set()  # queue values as notifications carry them

    def ensure_queue_set(self, queue: str | None) -> None:
        if queue not in self._declared:
            declare_work(self.channel, self.topology, queue)
            self._declared.add(queue)

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
                    if attempt == 2 or isinstance(exc, ConnectionBlockedTimeout):
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
        now = utcnow()
        for i, note in enumerate(notes):
            exchange, key, level = route(note, self.config, channel.topology, now)
            if exchange == channel.topology.work_exchange:
                channel.ensure_queue_set(note.queue)
            pipe.send(exchange, key, note, level, i)
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


def queue_depths(
    config: Config, queue_sets: Sequence[str | None]
) -> dict[tuple[str | None, str], int]:
    """Ready messages per (queue set, level), by passive declares; missing queues: 0."""
    return {key: ready for key, (ready, _consumers) in queue_stats(config, queue_sets).items()}


def queue_stats(
    config: Config, queue_sets: Sequence[str | None]
) -> dict[tuple[str | None, str], tuple[int, int]]:
    """(ready messages, consumers) per (queue set, level); missing queues: (0, 0)."""
    topology = Topology.of(config)
    connection = connect(config, "inspect")
    stats: dict[tuple[str | None, str], tuple[int, int]] = {}
    try:
        for queue in queue_sets:
            for level, name, _key in topology.queues_of(queue):
                channel = connection.channel()
                try:
                    ok = channel.queue_declare(name, passive=True)
                    stats[(queue, level)] = (ok.method.message_count, ok.method.consumer_count)
                    channel.close()
                except ChannelClosedByBroker:  # 404: the queue does not exist
                    stats[(queue, level)] = (0, 0)
    finally:
        if connection.is_open:
            connection.close()
    return stats
