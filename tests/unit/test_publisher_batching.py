"""How the background publisher's thread batches and waits, without a broker.

- ``PipelinedPublisher(..., "drained")`` ends its owner's wait once nothing is in flight
  (one wake-up per batch), ``"confirm"`` at the first confirm since ``rearm``.
- ``Sender`` holds the next batch for ``LINGER`` only under load: the last batch had more
  than one notification, handed off close together. A slow confirm that let two
  notifications 20 ms apart share a batch does not delay the next one.
"""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from pika import spec

from tomqueue.config import Config
from tomqueue.message import Notification
from tomqueue.topology import Topology
from tomqueue.transport import sender as sender_module
from tomqueue.transport.pipelined import PipelinedPublisher, Wake
from tomqueue.transport.sender import Entry, Sender

CONFIG = Config(amqp_url="amqp://guest:guest@127.0.0.1:1/%2F", prefix="tunitbatch")
RUN_AT = datetime(2020, 1, 1)


class FakeImpl:
    """pika's asynchronous channel and connection, as far as the publisher uses them."""

    channel_number = 1
    is_open = True

    def __init__(self) -> None:
        self.on_confirm: Any = None
        self.written: list[bytes] = []

    def add_on_return_callback(self, _callback: Any) -> None:
        pass

    def confirm_delivery(self, ack_nack_callback: Any, callback: Any) -> None:
        self.on_confirm = ack_nack_callback
        callback(None)

    def _output_marshaled_frames(self, frames: tuple[bytes, ...]) -> None:
        self.written += frames


class FakeConnection:
    def __init__(self) -> None:
        self._impl = FakeImpl()
        self.wakes = 0

    def channel(self) -> Any:
        return SimpleNamespace(_impl=self._impl, is_open=True)

    def add_callback_threadsafe(self, _callback: Any) -> None:
        self.wakes += 1


def publisher(wake: Wake) -> tuple[PipelinedPublisher, FakeConnection]:
    connection = FakeConnection()
    return PipelinedPublisher(connection, 5.0, wake), connection  # type: ignore[arg-type]


def ack(pipe: PipelinedPublisher, tag: int, multiple: bool = False) -> None:
    method = spec.Basic.Ack(delivery_tag=tag, multiple=multiple)
    pipe._impl.on_confirm(SimpleNamespace(method=method))


def send(pipe: PipelinedPublisher, count: int) -> None:
    for i in range(count):
        pipe.send("x", "k", Notification(i + 1, 1, RUN_AT), "normal", i + 1)


def test_drained_wakes_once_when_the_last_publish_in_flight_is_confirmed() -> None:
    pipe, connection = publisher("drained")
    send(pipe, 3)
    ack(pipe, 1)
    ack(pipe, 2)
    assert connection.wakes == 0
    ack(pipe, 3)
    assert connection.wakes == 1
    assert pipe.take_confirmed() == [1, 2, 3]
    send(pipe, 2)
    ack(pipe, 5, multiple=True)
    assert connection.wakes == 2  # re-armed by take_confirmed


def test_confirm_wakes_at_the_first_confirm_since_rearm() -> None:
    pipe, connection = publisher("confirm")
    send(pipe, 3)
    ack(pipe, 1)
    ack(pipe, 2)
    assert connection.wakes == 1
    pipe.rearm()
    ack(pipe, 3)
    assert connection.wakes == 2


class FakePipe:
    in_flight = 0

    def send(self, *_args: Any) -> None:
        pass

    def coalesce(self) -> None:
        pass


def sent_batch(handed_at: list[float]) -> Sender:
    """A sender that has just sent one batch of notifications handed off at those times
    and had it confirmed."""
    sender = Sender(CONFIG, lambda _confirmed, _given_up: None)
    sender._pipe = FakePipe()  # type: ignore[assignment]
    sender._declarer = SimpleNamespace(  # type: ignore[assignment]
        topology=Topology.of(CONFIG), ensure_queue_set=lambda _queue: None
    )
    sender.add(Entry(seq, Notification(seq, 1, RUN_AT), at) for seq, at in enumerate(handed_at, 1))
    sender._send_some()
    sender._last_send = handed_at[-1]
    sender._sent.clear()
    return sender


def test_a_lone_notification_is_not_held() -> None:
    sender = sent_batch([100.0])
    sender.add([Entry(9, Notification(9, 1, RUN_AT), 100.001)])
    assert sender._hold(100.001) <= 0


def test_under_load_the_next_batch_waits_for_the_linger() -> None:
    sender = sent_batch([100.0 + i * 0.0005 for i in range(10)])
    sender.add([Entry(99, Notification(99, 1, RUN_AT), 100.006)])
    assert sender._hold(100.006) == pytest.approx(sender_module.LINGER - 0.0015)


def test_two_notifications_far_apart_in_one_batch_are_not_load() -> None:
    """W3's shape: one notification every 20 ms; a confirm slower than that put two in
    one batch. The third must leave at once, not a linger after the batch."""
    sender = sent_batch([100.0, 100.02])
    sender.add([Entry(3, Notification(3, 1, RUN_AT), 100.04)])
    assert sender._hold(100.04) <= 0
