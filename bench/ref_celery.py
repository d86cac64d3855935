"""The Celery app of the W1 reference run: ``celery -A bench.ref_celery worker``.

One no-op task, ``noop``, that appends its time to the ledger (``bench.ref_ledger``). The
broker URL and the queue come from ``BENCH_REF_AMQP_URL`` and ``BENCH_REF_QUEUE`` in the
worker; the producer builds its own app with ``make_app(url, queue)``.

Settings are Celery's defaults (py-amqp through kombu, JSON, no result backend, no publisher
confirms, early acks, prefetch multiplier 4) except: a private queue and direct exchange
named after it, and no remote control, so no ``celery.pidbox`` objects on the shared broker.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from bench import ref_ledger

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
TASK_NAME = "bench.ref.noop"


def make_app(url: str, queue: str) -> tuple[Celery, Any]:
    """``(app, noop task)`` publishing to and consuming from ``queue`` on ``url``."""
    app = Celery("bench_ref", broker=url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name=TASK_NAME)
    def noop() -> None:
        ref_ledger.append_time(ref_ledger.ledger_path())

    return app, noop


app, noop = make_app(
    os.environ.get(ref_ledger.URL_ENV, DEFAULT_URL),
    os.environ.get(ref_ledger.QUEUE_ENV, "bench.ref.celery"),
)
