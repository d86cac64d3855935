"""The worker's RabbitMQ consumer: one consumer per priority level and queue set.

pika is not thread-safe. The connection is owned by the worker's main thread, which runs
``poll`` (pika I/O, heartbeats); job threads reach it only through ``_call``, which schedules
work on the owner thread with ``add_callback_threadsafe``. So heartbeats flow while jobs run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPError

from tomqueue.config import LEVELS, Config
from tomqueue.errors import BrokerUnavailable, ConfigError
from tomqueue.message import Notification
from tomqueue.topology import Topology
from tomqueue.transport.amqp import ConfirmedChannel, connect, declare_work
from tomqueue.transport.base import Delivery

log = logging.getLogger("tomqueue.amqp")
T = TypeVar("T")

DRAIN_SETTLE_SECONDS = 0.05  # for deliveries on their way when the queues look empty
READY_CHECK_INTERVAL = 0.05  # seconds a more urgent queue found empty is not asked again


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
        # every job place may hold one delivery running and one on its way up (recorded,
        # not yet acked) while read_ahead more wait in the buffer
        self.prefetch = min(65535, 2 * prefetch + config.read_ahead)
        self._owner = threading.get_ident()
        self._connection: BlockingConnection | None = None
        self._consume: BlockingChannel | None = None
        self._publish: ConfirmedChannel | None = None
        self._buffer: list[Delivery] = []
        self._generation = 0
        self._cancelled = False
        self._found_empty: dict[str, float] = {}  # queue name -> when basic.get found none
        self._unsettled: Counter[str] = Counter()  # queue name -> pushed, not acked/nacked
        self._last_settled: dict[str, float] = {}  # queue name -> when one was acked/nacked
        self._acks: list[Delivery] = []
        self._acks_lock = threading.Lock()
        self._outstanding: set[int] = set()  # delivery tags not acked or nacked yet

    # --- owner thread ----------------------------------------------------------------

    def start(self) -> None:
        self._owner = threading.get_ident()
        self._connection = connect(self.config, "worker")
        self._generation += 1
        self._unsettled.clear()  # the old channel's deliveries went back to the broker
        self._outstanding.clear()
        self._last_settled.clear()
        with self._acks_lock:
            self._acks = []  # tags of the old channel mean nothing on the new one
        try:
            self._open_channels(self._connection)
        except ConfigError:  # a queue of ours exists with other arguments: not transient
            self.close()
            raise
        except (AMQPError, OSError, ValueError) as exc:  # the connection broke meanwhile
            self.close()
            raise BrokerUnavailable(
                f"the broker connection broke while starting: {exc!r}"
            ) from None
        log.info(
            "consuming %s",
            ", ".join(
                self.topology.queue_name(q, lv) for lv in self.levels for q in self.queue_sets
            ),
        )

    def _open_channels(self, connection: BlockingConnection) -> None:
        self._publish = ConfirmedChannel(connection, self.config)
        self._consume = connection.channel()
        self._cancelled = False
        self._consume.add_on_cancel_callback(self._on_cancel)
        self._consume.basic_qos(prefetch_count=self.prefetch)
        for queue in self.queue_sets:
            declare_work(self._consume, self.topology, queue)
        for level in self.levels:  # most urgent first
            for queue in self.queue_sets:
                name = self.topology.queue_name(queue, level)
                self._consume.basic_consume(name, self._on_message(level, name))

    def _on_message(self, level: str, name: str) -> Callable[..., None]:
        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            self._found_empty.pop(name, None)  # it holds messages again: ask it again
            self._unsettled[name] += 1
            self._buffer.append(self._delivery(level, method, props, body, name))

        return on_message

    def _delivery(
        self, level: str, method: Any, props: Any, body: bytes, source: str = ""
    ) -> Delivery:
        self._outstanding.add(method.delivery_tag)
        return Delivery(
            body=body,
            level=level,
            headers=dict(props.headers or {}),
            tag=method.delivery_tag,
            received_at=time.monotonic(),
            redelivered=bool(method.redelivered),
            generation=self._generation,
            source=source,
        )

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
        publish = self._publish.channel if self._publish is not None else None
        for channel in (self._consume, publish):
            if channel is None or channel.is_closed:  # e.g. 406 after consumer_timeout
                raise BrokerUnavailable("the broker closed one of the worker's channels")
        if not self._buffer:
            self._connection.process_data_events(time_limit=timeout)
        else:
            self._connection.process_data_events(0)
        out, self._buffer = self._buffer, []
        return out

    def take_above(self, level: str, limit: int) -> list[Delivery]:
        """Up to ``limit`` messages of the levels more urgent than ``level`` still waiting in
        the broker, fetched (``basic.get``) before a ``level`` job starts.

        Each level's consumer holds at most its prefetch window: when a burst fills the more
        urgent window, the broker sends the next urgent message only after an ack has gone
        out, while less urgent ones already sit in our buffer. Fetching them is not limited
        by the window. A queue whose window has room (and has had it for a moment) is not
        asked: what it holds is on its way to us already, so an ordinary dispatch costs no
        round trip. A queue found empty is not asked again for ``READY_CHECK_INTERVAL``,
        unless the broker pushes us one of its messages meanwhile (a burst is still being
        published)."""
        assert self._consume is not None
        out: list[Delivery] = []
        now = time.monotonic()
        for higher in self.levels[: self.levels.index(level)]:
            for queue in self.queue_sets:
                name = self.topology.queue_name(queue, higher)
                if self._window_has_room(name, now):
                    continue
                if now - self._found_empty.get(name, -math.inf) < READY_CHECK_INTERVAL:
                    continue
                while len(out) < limit:
                    method, props, body = self._consume.basic_get(name, auto_ack=False)
                    if method is None:
                        self._found_empty[name] = now
                        break
                    out.append(self._delivery(higher, method, props, body))
        return out

    def _window_has_room(self, name: str, now: float) -> bool:
        """Room in the queue's window, and not just made by an ack: the broker has been
        free to push us what the queue holds (after an ack, the next message is still on
        its way: the queue is asked)."""
        settled = self._last_settled.get(name, -math.inf)
        return self._unsettled[name] < self.prefetch and now - settled > READY_CHECK_INTERVAL

    def is_drained(self) -> bool:
        """No message ready in our queues, and none already sent to us: deliveries the
        broker dispatched before answering the declares are let in before saying so."""
        if self._buffer or self._publish is None or self._connection is None:
            return False
        for level in self.levels:
            for queue in self.queue_sets:
                name = self.topology.queue_name(queue, level)
                if self._publish.channel.queue_declare(name, passive=True).method.message_count:
                    return False
        self._connection.process_data_events(DRAIN_SETTLE_SECONDS)
        return not self._buffer

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
        self.ack_many([delivery])

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Sent asynchronously: nothing waits for an ack (a lost one means a redelivery,
        which the row's version and lock make harmless). Acks queue up and one wake-up of
        the connection's thread sends all that are waiting."""
        claimed = [d for d in deliveries if d.claim_ack()]
        if claimed:
            with self._acks_lock:
                first = not self._acks
                self._acks += claimed
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
        acks = [d for d in acks if d.generation == self._generation]
        for delivery in acks:
            self._settled(delivery)
        self._send_acks(channel, {d.tag for d in acks})

    def _send_acks(self, channel: BlockingChannel, tags: set[int]) -> None:
        """One ``basic.ack`` with ``multiple`` for the tags below every delivery still
        outstanding (it settles exactly those: the broker numbers a channel's deliveries
        in order, and any it has sent that we have not read yet come after every tag we
        know), one ``basic.ack`` each for the others. A batch of acks is then one frame,
        not one per job, for us and for the broker."""
        self._outstanding -= tags
        below = min(self._outstanding, default=math.inf)
        covered = [tag for tag in tags if tag < below]
        if covered:
            channel._impl.basic_ack(max(covered), multiple=True)
        for tag in sorted(tag for tag in tags if tag >= below):
            channel._impl.basic_ack(tag)

    def _settled(self, delivery: Delivery) -> None:
        if delivery.source:
            self._unsettled[delivery.source] -= 1
            self._last_settled[delivery.source] = time.monotonic()

    def requeue(self, delivery: Delivery) -> None:
        def nack() -> None:
            if delivery.generation == self._generation and self._consume is not None:
                self._consume.basic_nack(delivery.tag, requeue=True)
                self._outstanding.discard(delivery.tag)
                self._settled(delivery)

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
