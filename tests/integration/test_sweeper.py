"""The sweeper republishes what may have no notification, and leaves a backlog alone."""

from __future__ import annotations

from datetime import timedelta

import pika
from sqlalchemy import update

import tomqueue
from tests.conftest import AMQP_URL, Stack, drain_queue, on_stacks, queue_depth
from tests.jobs import Record
from tomqueue.db import get_engine, utcnow
from tomqueue.schema import Job
from tomqueue.sweeper import republish

STACKS = (("postgresql", "amqp"), ("mysql", "amqp"))


def make_quiet(stack: Stack) -> None:
    """Pretend every job was notified long ago (past ``sweep_quiet``)."""
    long_ago = utcnow() - timedelta(seconds=stack.config.sweep_quiet * 2)
    with get_engine(stack.config).begin() as conn:
        conn.execute(update(Job).values(notified_at=long_ago))


@on_stacks(*STACKS)
def test_lost_notifications_are_republished_once_the_queue_is_empty(
    stack: Stack, ledger_path: str
) -> None:
    config = stack.config
    name = f"{config.prefix}.balance.normal"
    for i in range(5):
        tomqueue.enqueue(Record(ledger_path, f"r{i}"))
    assert tomqueue.flush(30)
    drain_queue(config, name)  # the notifications are lost
    make_quiet(stack)

    assert republish(config, skip_backlogged=True) == 5
    assert queue_depth(config, name)[0] == 5


@on_stacks(*STACKS)
def test_a_backlog_held_partly_by_a_consumer_gets_no_duplicates(
    stack: Stack, ledger_path: str
) -> None:
    """50 due jobs: 40 notifications ready in the queue, 10 prefetched (unacked) by a
    consumer. Every job has its notification: the sweeper must not add 50 more."""
    config = stack.config
    name = f"{config.prefix}.balance.normal"
    for i in range(50):
        tomqueue.enqueue(Record(ledger_path, f"b{i}"))
    assert tomqueue.flush(30)  # enqueue returns before the broker has the notification
    make_quiet(stack)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=10)
        held: list[int] = []
        channel.basic_consume(name, lambda _ch, method, _p, _b: held.append(method.delivery_tag))
        deadline = 50
        while len(held) < 10 and deadline:
            connection.process_data_events(0.1)
            deadline -= 1
        assert len(held) == 10
        assert queue_depth(config, name) == (40, 1)

        assert republish(config, skip_backlogged=True) == 0
        assert queue_depth(config, name)[0] == 40
    finally:
        connection.close()  # the 10 go back to the queue
