"""Publishing with many publisher confirms in flight on one channel.

``BlockingChannel.basic_publish`` in confirm mode waits for each confirm before the next
publish: about 800 publishes/s. The manager must release thousands of jobs due in the same
second, so this publisher keeps up to a window of publishes unconfirmed and settles them as
the broker's ``basic.ack`` / ``basic.nack`` frames arrive (3-5k/s).

It drives pika's asynchronous channel underneath a ``BlockingChannel`` (``channel._impl``):
pika's blocking adapter has no public pipelined-confirm API. A publish's frames are written
out by ``frames`` (the same bytes as pika's, at a fraction of the cost) and handed to the
connection's output buffer. Callbacks run inside pika's I/O loop, so they only record
results; the owner acts on them after ``process_data_events``.

A publish succeeds when the broker acks it and did not return it (``mandatory``): a returned
message is matched to its ack by (exchange, routing key, body) — identical messages are
interchangeable. Nacks, returns and confirms that never come are failures.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from itertools import takewhile
from typing import Any, Literal

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import ChannelWrongStateError

from tomqueue.errors import PublishError
from tomqueue.message import Notification
from tomqueue.transport.frames import publish_frames

InFlight = tuple[int, float, str, str, bytes]  # (delivery tag, sent at, exchange, key, body)
Wake = Literal["confirm", "drained"]


def _noop() -> None:
    return None


class PipelinedPublisher:
    """A confirm-mode channel with unconfirmed publishes in flight (owner thread only)."""

    def __init__(
        self, connection: BlockingConnection, timeout: float, wake: Wake = "confirm"
    ) -> None:
        """``wake``: when a confirm ends the owner's ``process_data_events`` wait early (one
        more system call pair per wake-up): at the first confirm since ``rearm``
        (``"confirm"``), or once nothing is in flight any more (``"drained"``: an owner
        that sends a batch only when the previous one is settled)."""
        self.timeout = timeout
        self._connection = connection
        self.channel: BlockingChannel = connection.channel()
        self._impl: Any = self.channel._impl  # pika's asynchronous Channel
        self._seq = 0
        self._in_flight: dict[int, InFlight] = {}
        self._returned: Counter[tuple[str, str, bytes]] = Counter()
        self._confirmed: list[int] = []
        self._failures: list[tuple[int, str]] = []  # (tag, what went wrong)
        self._woken = False
        self._wake_each = wake == "confirm"
        self._impl.add_on_return_callback(self._on_return)
        self._enable_confirms()

    def _enable_confirms(self) -> None:
        ready: list[bool] = []
        self._impl.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=lambda _frame: ready.append(True)
        )
        deadline = time.monotonic() + self.timeout
        while not ready:
            if time.monotonic() > deadline or not self.channel.is_open:
                raise PublishError("the broker did not enable publisher confirms in time")
            self._connection.process_data_events(0.01)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def send(self, exchange: str, key: str, note: Notification, level: str, tag: int) -> None:
        """Publish a notification (mandatory, persistent: ``frames``); ``tag`` comes back
        from ``take_confirmed`` once confirmed."""
        if not self._impl.is_open:
            raise ChannelWrongStateError("the publishing channel is not open")
        body, frames = publish_frames(self._impl.channel_number, exchange, key, note, level)
        self._output(frames)
        self._seq += 1
        self._in_flight[self._seq] = (tag, time.monotonic(), exchange, key, body)

    def _output(self, frames: bytes) -> None:
        """Into the connection's output buffer (pika's own path for marshaled frames, which
        also counts them), written by the next ``process_data_events``."""
        self._connection._impl._output_marshaled_frames((frames,))

    def coalesce(self) -> None:
        """Join the frames waiting to be written into one buffer. pika writes every piece
        of its output buffer with its own ``send()`` — one system call per publish, each
        also waking the broker — so after a batch of ``send`` calls one write carries them
        all."""
        transport = getattr(self._connection._impl, "_transport", None)
        buffers = getattr(transport, "_tx_buffers", None)
        if isinstance(buffers, deque) and len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)

    def take_confirmed(self) -> list[int]:
        """Delivery tags of the publishes confirmed since the last call."""
        confirmed, self._confirmed = self._confirmed, []
        self.rearm()
        return confirmed

    def rearm(self) -> None:
        """Let the next confirm end the owner's ``process_data_events`` wait early."""
        self._woken = False

    def take_failures(self) -> list[str]:
        """What went wrong with the publishes that failed since the last call."""
        return [reason for _tag, reason in self.take_failed()]

    def take_failed(self) -> list[tuple[int, str]]:
        """(tag, what went wrong) of the publishes that failed since the last call."""
        failures, self._failures = self._failures, []
        return failures

    def overdue(self, now: float) -> bool:
        """True if the oldest unconfirmed publish has waited longer than ``timeout``."""
        for _tag, sent_at, *_rest in self._in_flight.values():
            return now - sent_at > self.timeout
        return False

    # --- pika I/O-loop callbacks: record only ---------------------------------------------

    def _on_return(self, _channel: Any, method: Any, _props: Any, body: bytes) -> None:
        self._returned[(method.exchange, method.routing_key, body)] += 1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        seqs = [method.delivery_tag]
        if method.multiple:  # seqs are in publish order: stop at the first one above
            seqs = list(takewhile(lambda s: s <= method.delivery_tag, self._in_flight))
        for seq in seqs:
            item = self._in_flight.pop(seq, None)
            if item is not None:
                self._settle(item, acked)
        if not self._woken and (self._wake_each or not self._in_flight):
            # end the owner's process_data_events wait early
            self._woken = True
            self._connection.add_callback_threadsafe(_noop)

    def _settle(self, item: InFlight, acked: bool) -> None:
        tag, _sent_at, exchange, key, body = item
        route = (exchange, key, body)
        if self._returned[route] > 0:
            self._returned[route] -= 1
            if self._returned[route] == 0:
                del self._returned[route]
            self._failures.append((tag, f"returned as unroutable by {exchange!r} with key {key!r}"))
        elif not acked:
            self._failures.append((tag, f"nacked by the broker ({exchange!r}, key {key!r})"))
        else:
            self._confirmed.append(tag)
