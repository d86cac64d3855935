"""The worker's consumer acks a batch with one ``basic.ack`` (``multiple``) when it can,
and never acks a delivery it has not finished with."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tomqueue.config import Config
from tomqueue.transport.amqp_consumer import AmqpConsumer
from tomqueue.transport.base import Delivery


class FakeImpl:
    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


def consumer() -> tuple[AmqpConsumer, FakeImpl]:
    c = AmqpConsumer(Config(database_url="sqlite://", amqp_url="amqp://localhost"), [None])
    impl = FakeImpl()
    c._consume = SimpleNamespace(is_open=True, _impl=impl)  # type: ignore[assignment]
    return c, impl


def deliver(c: AmqpConsumer, *tags: int) -> dict[int, Delivery]:
    def one(tag: int) -> Delivery:
        method = SimpleNamespace(delivery_tag=tag, redelivered=False)
        return c._delivery("normal", method, SimpleNamespace(headers={}), b"{}", "q")

    return {tag: one(tag) for tag in tags}


def ack(c: AmqpConsumer, deliveries: Any) -> None:
    c.ack_many(list(deliveries))  # on the owner thread: sent at once


def test_a_batch_below_every_unfinished_delivery_is_one_multiple_ack() -> None:
    c, impl = consumer()
    d = deliver(c, 1, 2, 3, 4, 5, 6)
    ack(c, [d[3], d[1], d[2], d[5]])
    assert impl.acks == [(3, True), (5, False)]  # 4 is still running: 5 goes on its own
    ack(c, [d[4]])
    assert impl.acks[2:] == [(4, True)]  # 5 was acked already: "up to 4" settles just 4
    ack(c, [d[6]])
    assert impl.acks[3:] == [(6, True)]


def test_a_requeued_delivery_does_not_hold_the_multiple_ack_back() -> None:
    c, impl = consumer()
    c._consume.basic_nack = lambda tag, requeue: impl.acks.append((-tag, requeue))  # type: ignore[union-attr]
    d = deliver(c, 7, 8, 9)
    c.requeue(d[7])
    ack(c, [d[8], d[9]])
    assert impl.acks == [(-7, True), (9, True)]


def test_deliveries_of_an_older_connection_are_not_acked() -> None:
    c, impl = consumer()
    d = deliver(c, 1, 2)
    c._generation += 1  # reconnected: these tags mean nothing on the new channel
    ack(c, d.values())
    assert impl.acks == []
