"""The sweeper: the database is the truth, so notifications can always be rebuilt from it.

It finds jobs that should have a notification in flight but may not — due, unfailed, not
notified for ``sweep_quiet`` seconds, and unlocked or with an expired lock — and
publishes their notifications again. ``tomqueue republish`` runs it once; ``--all`` takes every
unfailed job (future ones go to the deferred queue). Duplicates are harmless: a worker
checks the row's version and lock before running anything.

Every sweep reports how late the jobs it republished were — ``lateness`` (now - run_at of
the most overdue one) and ``since_notified`` (the longest a republished job had gone
without a notification) — in its log line, as metrics and in the sweeper lease's row for
``tomqueue status`` (see ``tomqueue.sweep_report``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, Row, or_, select, update

from tomqueue import metrics
from tomqueue.config import Config
from tomqueue.db import db_now, get_engine, now_sql
from tomqueue.handler import handler_kind
from tomqueue.leases import lock_is_free, try_acquire
from tomqueue.message import Notification
from tomqueue.schema import Job
from tomqueue.sweep_report import LagGauge, SweepReport, Tally, ready_jobs, save_report
from tomqueue.transport import get_publisher

log = logging.getLogger("tomqueue.sweeper")

Candidate = Row[int, int, datetime, int, str | None, str, datetime | None]

BATCH = 1000
PREFETCH_ALLOWANCE = 200  # unacked messages a consumer may hold (its prefetch), at most


def backlogged_queues(conn: Connection, config: Config, now: datetime) -> list[str | None]:
    """Queue sets with a backlog in the broker that accounts for their due, unlocked jobs:
    their notifications are presumably waiting (ready, or prefetched by a consumer), so
    republishing would only pile duplicates onto the backlog. A notification lost there is
    found once the backlog drains (or when the jobs outnumber it by more than what the
    consumers may hold prefetched: ``PREFETCH_ALLOWANCE`` each)."""
    return backlogged(config, ready_jobs(conn, now))


def backlogged(
    config: Config, ready: dict[tuple[str | None, int], tuple[int, datetime]]
) -> list[str | None]:
    """``backlogged_queues`` from the due, unlocked jobs counted by ``ready_jobs``."""
    if not config.uses_broker or not ready:
        return []
    due: dict[str | None, int] = {}
    for (queue, _priority), (count, _oldest) in ready.items():
        due[queue] = due.get(queue, 0) + count
    from tomqueue.transport.amqp import queue_stats

    stats = queue_stats(config, list(due))
    found = []
    for queue, n in due.items():
        ready_there = sum(r for (q, _lv), (r, _c) in stats.items() if q == queue)
        consumers = sum(c for (q, _lv), (_r, c) in stats.items() if q == queue)
        if ready_there > 0 and ready_there + consumers * PREFETCH_ALLOWANCE >= n:
            found.append(queue)
    return found


def _candidates(
    conn: Connection,
    config: Config,
    everything: bool,
    after_id: int,
    now: datetime,
    skip_queues: Sequence[str | None] = (),
) -> list[Candidate]:
    query = select(
        Job.id, Job.version, Job.run_at, Job.priority, Job.queue, Job.handler, Job.notified_at
    ).where(Job.failed_at.is_(None), Job.id > after_id, lock_is_free(now, config))
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
    return list(conn.execute(query.order_by(Job.id).limit(BATCH)).all())


def republish(
    config: Config,
    everything: bool = False,
    echo: Callable[[str], None] | None = None,
    skip_backlogged: bool = False,
) -> int:
    """Publish notifications for jobs that may have none; return how many were sent.

    ``skip_backlogged`` (the periodic sweeper) leaves out queue sets whose broker queues
    already hold as many messages as they have due jobs (see ``backlogged_queues``)."""
    skip: list[str | None] = []
    if skip_backlogged:
        with get_engine(config).connect() as conn:
            skip = backlogged_queues(conn, config, db_now(conn))
    return sweep(config, everything, echo, skip).republished


def sweep(
    config: Config,
    everything: bool = False,
    echo: Callable[[str], None] | None = None,
    skip: Sequence[str | None] = (),
    action: str = "republish",
) -> SweepReport:
    """One pass over the candidates, in batches; what it republished and how late. The log
    line's ``action`` is ``republish`` (on demand) or ``sweep`` (the periodic sweeper)."""
    engine, publisher = get_engine(config), get_publisher(config)
    tally, after_id, started = Tally(), 0, time.monotonic()
    while True:
        with engine.connect() as conn:
            now = db_now(conn)
            rows = _candidates(conn, config, everything, after_id, now, skip)
        if not rows:
            break
        publisher.publish([_note(r) for r in rows])
        with engine.begin() as conn:
            conn.execute(
                update(Job)
                .where(Job.id.in_([r.id for r in rows]))
                .values(notified_at=now_sql(engine.dialect.name))
            )
        tally.add(now, [(r.run_at, r.notified_at) for r in rows])
        after_id = rows[-1].id
        if echo:
            echo(f"... {tally.count} notification(s) republished (up to job {after_id})")
    report = tally.report(time.monotonic() - started)
    _log(report, action)
    return report


def _note(row: Candidate) -> Notification:
    return Notification(
        row.id, row.version, row.run_at, row.priority, row.queue, handler_kind(row.handler)
    )


def _log(report: SweepReport, action: str) -> None:
    late = ""
    if report.lateness is not None:
        late = f"; the most overdue was {report.lateness:.1f}s past its run_at"
    if report.since_notified is not None:
        late += f", the longest unnotified {report.since_notified:.1f}s"
    log.info(
        "republished %d notification(s)%s",
        report.republished,
        late,
        extra={"action": action, **report.log_keys()},
    )
    for lateness, since_notified in report.observed:
        metrics.SWEEP_LATENESS.observe(lateness)
        if since_notified is not None:
            metrics.SWEEP_SINCE_NOTIFIED.observe(since_notified)


class PeriodicSweeper:
    """Runs ``republish`` every ``sweep_interval`` in a background thread, when this process
    holds the ``sweeper`` lease: several workers cooperate, one sweeps at a time. The
    holder also sets the queue lag gauge and records each sweep's report in the lease."""

    def __init__(self, config: Config, holder: str) -> None:
        self.config = config
        self.holder = holder
        self.lag = LagGauge(config)
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
                now = db_now(conn)
                if not try_acquire(conn, "sweeper", self.holder, ttl, now):
                    self.lag.clear()  # the holder reports it
                    return 0
                ready = ready_jobs(conn, now)
            self.lag.set(ready, now)
            report = sweep(self.config, skip=backlogged(self.config, ready), action="sweep")
            save_report(engine, self.holder, report)
            return report.republished
        except Exception as exc:  # the next round tries again
            log.warning("sweep failed: %s", exc, extra={"action": "sweep_failed"})
            return 0
