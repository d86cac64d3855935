"""The Dramatiq broker and actor of the W1 reference run: ``dramatiq bench.ref_dramatiq``.

One no-op actor, ``noop``, that appends its time to the ledger (``bench.ref_ledger``). The
worker reads the broker URL and the queue from ``BENCH_REF_AMQP_URL`` and
``BENCH_REF_QUEUE`` when it imports this module; the producer calls ``make(url, queue)``.

Settings are Dramatiq's defaults (``RabbitmqBroker`` on pika, no publisher confirms, default
middleware, acks after the actor ran, prefetch 2 x threads) with a private queue (Dramatiq
adds ``<queue>.DQ`` and ``<queue>.XQ`` beside it).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench import ref_ledger

ACTOR_NAME = "bench_ref_noop"


def make(url: str, queue: str) -> tuple[RabbitmqBroker, Any]:
    """``(broker, noop actor)`` on ``queue``; the broker becomes Dramatiq's global one."""
    broker = RabbitmqBroker(url=url)
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name=ACTOR_NAME, queue_name=queue, broker=broker)
    def noop() -> None:
        ref_ledger.append_time(ref_ledger.ledger_path())

    return broker, noop


if os.environ.get(ref_ledger.QUEUE_ENV):  # the worker: `dramatiq bench.ref_dramatiq`
    broker, noop = make(os.environ[ref_ledger.URL_ENV], os.environ[ref_ledger.QUEUE_ENV])
