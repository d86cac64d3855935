"""The one value that flows down the worker stack, and what every layer can reach."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from tomqueue.config import Config
from tomqueue.connections import HeldConnection
from tomqueue.message import Notification
from tomqueue.schema import Job
from tomqueue.transport.base import Consumer, Delivery
from tomqueue.worker import hot_sql
from tomqueue.worker.claims import Claims
from tomqueue.worker.outcome import Outcome

if TYPE_CHECKING:
    from tomqueue.worker.watchdog import Watchdog


@dataclass
class Context:
    """Shared by every job of one worker process."""

    config: Config
    engine: Engine
    consumer: Consumer
    allowed_modules: Collection[str]
    name: str
    stopping: threading.Event = field(default_factory=threading.Event)
    stop_deadline: float | None = None
    abandoned_threads: int = 0
    lease_valid: Callable[[], bool] = lambda: True
    running_jobs: set[int] = field(default_factory=set)  # locked by us: running, or unrecorded
    unrecorded: list[Work] = field(default_factory=list)  # outcomes not written yet (db_lock)
    counters: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the job ids each locker thread is locking (kept apart only where needed: claims.py)
    claims: Claims = field(default_factory=lambda: Claims(exclusive=False))
    watchdog: Watchdog | None = None  # set by the pipeline that runs the jobs
    _held: threading.local = field(default_factory=threading.local)

    def __post_init__(self) -> None:
        if self.engine is not None and hot_sql.reads_back(self.engine.dialect.name):
            self.claims = Claims(exclusive=True)

    def connection(self) -> HeldConnection:
        """This thread's own database connection, kept between batches."""
        held: HeldConnection | None = getattr(self._held, "connection", None)
        if held is None:
            held = self._held.connection = HeldConnection(self.config)
        return held

    def release_connection(self) -> None:
        held: HeldConnection | None = getattr(self._held, "connection", None)
        if held is not None:
            held.close()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + n


@dataclass(frozen=True)
class StartAt:
    """When a job locked before its ``run_at`` starts: at ``run_at`` (Unix time) by this
    host's clock, kept between ``earliest`` and ``latest`` (monotonic), when the database
    clock reaches it at the earliest and at the latest (the lock statement read that clock
    between being sent and returning): a host clock off by more does not decide."""

    earliest: float
    latest: float
    run_at: float

    def seconds_left(self) -> float:
        now = time.monotonic()
        if now >= self.latest:
            return 0.0
        return max(self.earliest - now, self.run_at - time.time(), 0.0)


@dataclass(eq=False)
class Work:
    """One delivery on its way down the stack and back up; each layer fills in its part."""

    ctx: Context
    delivery: Delivery
    note: Notification | None = None  # pop: the decoded notification
    stopped: str | None = None  # a batch layer stopped it early (why); it goes back up
    requeued: bool = False  # error handling gave the delivery back: nothing more to do
    job: Job | None = None  # db_lock: detached snapshot of the locked row
    fence: int = 0  # db_lock: the fencing token every later write is conditioned on
    locked_at: datetime | None = None  # db_lock: database time of the lock
    started: float = 0.0  # db_lock: monotonic time of the lock (timeout: of its run_at)
    start_at: StartAt | None = None  # db_lock: locked before its run_at: when it may start
    payload: Any = None  # db_lock: the rebuilt payload object
    load_error: str | None = None  # db_lock: why the handler could not be rebuilt
    give_up: str | None = None  # db_lock: crashed too often; fail without running
    takeover: dict[str, Any] | None = None  # db_lock: crash counts when a dead lock was taken
    abandoned: bool = False  # timeout: the job thread ignored its interruption
    abandoned_at: datetime | None = None  # timeout: (database) time it was abandoned
    abandoned_outcome: Outcome | None = None  # timeout: decided when it was abandoned
    outcome: Outcome | None = None  # timeout / invoke: what happened
    follow_ups: list[Notification] = field(default_factory=list)  # published before the ack

    def stop(self, reason: str) -> None:
        """A batch layer is done with this delivery: it skips the layers below."""
        self.stopped = reason

    @property
    def queue(self) -> str:
        queue = self.job.queue if self.job is not None else None
        return queue or self.ctx.config.default_queue

    @property
    def log_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"action": "perform"}
        if self.note is not None:
            extra["job_id"] = self.note.job_id
        if self.job is not None:
            extra["queue"] = self.job.queue or self.ctx.config.default_queue
            extra["job_class"] = self.job.name
        return extra


Next = Callable[[Work], None]
"""The rest of the per-job stack below a layer."""

Batch = list[Work]
BatchNext = Callable[[Batch], None]
"""The rest of the batch stack below a layer."""
