"""The sweeper: the database is the truth, so notifications can always be rebuilt from it.

It finds jobs that should have a notification in flight but may not — due, unfailed, not
notified for ``sweep_quiet`` seconds, and unlocked or with an expired lock — and
publishes their notifications again. ``tomqueue republish`` runs it once; ``--all`` takes every
unfailed job (future ones go to the deferred queue). Duplicates are harmless: a worker
checks the row's version and lock before running anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, or_, select, update

from tomqueue.config import Config
from tomqueue.db import db_now, get_engine, now_sql
from tomqueue.handler import handler_kind
from tomqueue.leases import lock_is_free, try_acquire
from tomqueue.message import Notification
from tomqueue.schema import Job
from tomqueue.transport import get_publisher

log = logging.getLogger("tomqueue.sweeper")

BATCH = 1000
PREFETCH_ALLOWANCE = 200  # unacked messages a consumer may hold (its prefetch), at most


def backlogged_queues(conn: Connection, config: Config, now: datetime) -> list[str | None]:
    """Queue sets with a backlog in the broker that accounts for their due, unlocked jobs:
    their notifications are presumably waiting (ready, or prefetched by a consumer), so
    republishing would only pile duplicates onto the backlog. A notification lost there is
    found once the backlog drains (or when the jobs outnumber it by more than what the
    consumers may hold prefetched: ``PREFETCH_ALLOWANCE`` each)."""
    if not config.uses_broker:
        return []
    due = conn.execute(
        select(Job.queue, func.count())
        .where(Job.failed_at.is_(None), Job.locked_at.is_(None), Job.run_at <= now)
        .group_by(Job.queue)
    ).all()
    if not due:
        return []
    from tomqueue.transport.amqp import queue_stats

    stats = queue_stats(config, [queue for queue, _n in due])
    backlogged = []
    for queue, n in due:
        ready = sum(r for (q, _lv), (r, _c) in stats.items() if q == queue)
        consumers = sum(c for (q, _lv), (_r, c) in stats.items() if q == queue)
        if ready > 0 and ready + consumers * PREFETCH_ALLOWANCE >= n:
            backlogged.append(queue)
    return backlogged


def _candidates(
    conn: Connection,
    config: Config,
    everything: bool,
    after_id: int,
    now: datetime,
    skip_queues: Sequence[str | None] = (),
) -> list[Notification]:
    query = select(Job.id, Job.version, Job.run_at, Job.priority, Job.queue, Job.handler).where(
        Job.failed_at.is_(None), Job.id > after_id, lock_is_free(now, config)
    )
    named = [q for q in skip_queues if q is not None]
    if named:
        query = query.where(or_(Job.queue.is_(None), Job.queue.not_in(named)))
    if None in skip_queues:
        query = query.where(Job.queue.is_not(None))
    if not everything:
        quiet_since = now - timedelta(seconds=config.sweep_quiet)
        query = query.where(
            Job.run_at <= now,
            or_(Job.notified_at.is_(None), Job.notified_at < quiet_since),
        )
    rows = conn.execute(query.order_by(Job.id).limit(BATCH)).all()
    return [
        Notification(r.id, r.version, r.run_at, r.priority, r.queue, handler_kind(r.handler))
        for r in rows
    ]


def republish(
    config: Config,
    everything: bool = False,
    echo: Callable[[str], None] | None = None,
    skip_backlogged: bool = False,
) -> int:
    """Publish notifications for jobs that may have none; return how many were sent.

    ``skip_backlogged`` (the periodic sweeper) leaves out queue sets whose broker queues
    already hold as many messages as they have due jobs (see ``backlogged_queues``)."""
    engine, publisher = get_engine(config), get_publisher(config)
    sent, after_id = 0, 0
    skip: list[str | None] = []
    if skip_backlogged:
        with engine.connect() as conn:
            skip = backlogged_queues(conn, config, db_now(conn))
    while True:
        with engine.connect() as conn:
            notes = _candidates(conn, config, everything, after_id, db_now(conn), skip)
        if not notes:
            break
        publisher.publish(notes)
        with engine.begin() as conn:
            conn.execute(
                update(Job)
                .where(Job.id.in_([n.job_id for n in notes]))
                .values(notified_at=now_sql(engine.dialect.name))
            )
        sent += len(notes)
        after_id = notes[-1].job_id
        if echo:
            echo(f"... {sent} notification(s) republished (up to job {after_id})")
    log.info("republished %d notification(s)", sent, extra={"action": "republish"})
    return sent


class PeriodicSweeper:
    """Runs ``republish`` every ``sweep_interval`` in a background thread, when this process
    holds the ``sweeper`` lease: several workers cooperate, one sweeps at a time."""

    def __init__(self, config: Config, holder: str) -> None:
        self.config = config
        self.holder = holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tomqueue-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.config.sweep_interval):
            self.sweep_once()

    def sweep_once(self) -> int:
        engine = get_engine(self.config)
        try:
            with engine.begin() as conn:
                ttl = self.config.sweep_interval * 2
                mine = try_acquire(conn, "sweeper", self.holder, ttl, db_now(conn))
            return republish(self.config, skip_backlogged=True) if mine else 0
        except Exception as exc:  # the next round tries again
            log.warning("sweep failed: %s", exc, extra={"action": "sweep_failed"})
            return 0
