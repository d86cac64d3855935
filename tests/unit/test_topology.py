"""Names on the broker: the one place they are spelled (what the management UI shows)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tomqueue import Config, EnqueueError
from tomqueue.message import Notification
from tomqueue.topology import Topology
from tomqueue.transport.amqp import route


def test_default_queue_set_names() -> None:
    topology = Topology.of(Config(prefix="app"))
    assert topology.work_exchange == "app.work"
    assert topology.deferred_exchange == "app.work.deferred"
    assert topology.deferred_queue == "app.work.deferred"
    assert [name for _level, name, _key in topology.queues_of(None)] == [
        "app.balance.high",
        "app.balance.normal",
        "app.balance.low",
        "app.balance.bulk",
    ]
    assert topology.routing_key(None, "normal") == "balance.normal"


def test_named_queue_gets_its_own_set() -> None:
    topology = Topology.of(Config(prefix="app"))
    assert topology.queue_name("mail", "high") == "app.mail.high"
    assert topology.routing_key("mail", "bulk") == "mail.bulk"
    assert topology.queues_of("mail")[0] == ("high", "app.mail.high", "mail.high")


def test_configured_default_queue_name() -> None:
    topology = Topology.of(Config(prefix="app", default_queue="main"))
    assert topology.queue_name(None, "low") == "app.main.low"


@pytest.mark.parametrize("queue", ["has space", "a.b", "x" * 65, "#", "*"])
def test_queue_names_that_would_break_routing_are_refused(queue: str) -> None:
    with pytest.raises(EnqueueError):
        Topology.of(Config()).routing_key(queue, "normal")


def test_a_notification_is_routed_by_the_clock_it_is_given() -> None:
    """The publisher reads the clock once per batch and routes each notification by it: a
    job due within half a millisecond of that moment goes to work, a later one is deferred."""
    config = Config(prefix="tq")
    topology = Topology.of(config)
    now = datetime(2026, 12, 7, 12, 0, 0)
    due = Notification(1, 1, now + timedelta(microseconds=500), priority=0)
    later = Notification(2, 1, now + timedelta(microseconds=501), priority=0)
    assert route(due, config, topology, now) == ("tq.work", "balance.normal", "normal")
    assert route(later, config, topology, now) == ("tq.work.deferred", "", "normal")
    assert route(later, config, topology, now + timedelta(milliseconds=1))[0] == "tq.work"
    assert route(later, config, topology)[0] == "tq.work"  # no clock given: read now
