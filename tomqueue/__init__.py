"""TomQueue: Delayed::Job-compatible background jobs; the database is the truth, RabbitMQ
carries the notifications.

    from tomqueue import Delayed
    Delayed.enqueue(MyJob(), priority=0, run_at=None, queue=None)
    tomqueue.flush()  # wait for the broker's confirms of what was enqueued so far
"""

from __future__ import annotations

from tomqueue import lifecycle
from tomqueue.config import Config, configure, current
from tomqueue.delay import PerformableMethod, delay, handle_asynchronously
from tomqueue.enqueue import enqueue, enqueue_many, flush
from tomqueue.errors import (
    BrokerUnavailable,
    ConfigError,
    DatabaseUnavailable,
    EnqueueError,
    HandlerError,
    JobTimeout,
    MessageError,
    PublishError,
    SerializationError,
    TomQueueError,
)
from tomqueue.schema import Job
from tomqueue.worker.process import Worker
from tomqueue.worker.work_off import work_off

__version__ = "0.1.0"


class Delayed:
    """Delayed::Job's namespace: ``Delayed.enqueue``, ``Delayed.Job``, ``Delayed.Worker``."""

    Job = Job
    Worker = Worker
    enqueue = staticmethod(enqueue)
    enqueue_many = staticmethod(enqueue_many)
    work_off = staticmethod(work_off)


__all__ = [
    "BrokerUnavailable",
    "Config",
    "ConfigError",
    "DatabaseUnavailable",
    "Delayed",
    "EnqueueError",
    "HandlerError",
    "Job",
    "JobTimeout",
    "MessageError",
    "PerformableMethod",
    "PublishError",
    "SerializationError",
    "TomQueueError",
    "Worker",
    "configure",
    "current",
    "delay",
    "enqueue",
    "enqueue_many",
    "flush",
    "handle_asynchronously",
    "lifecycle",
    "work_off",
]
