"""What the sweeper reports: how late the jobs it republished were, and the queue lag.

- Per sweep, ``lateness`` is ``now - run_at`` of the most overdue job it republished and
  ``since_notified`` the longest ``now - notified_at`` among them (``None`` when none had
  been notified before). Both go to the sweep's log line (stable keys ``republished``,
  ``lateness``, ``since_notified``, ``duration``), to the histograms
  ``tomqueue_sweep_lateness_seconds`` and ``tomqueue_sweep_since_notified_seconds`` (one
  observation per republished job), and — for the periodic sweeper — to the ``report``
  column of its lease (``tomqueue_leases``), which ``tomqueue status`` shows.
- The worker holding the sweeper lease sets ``tomqueue_queue_lag_seconds{queue,level}``,
  the age of the oldest ready job, every ``sweep_interval``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, inspect, select, update

from tomqueue import metrics
from tomqueue.config import Config
from tomqueue.db import db_now
from tomqueue.schema import Job, Lease

Ready = dict[tuple[str | None, int], tuple[int, datetime]]


@dataclass(frozen=True)
class SweepReport:
    republished: int
    lateness: float | None  # seconds past run_at of the most overdue republished job
    since_notified: float | None  # longest time a republished job had gone unnotified
    duration: float
    observed: list[tuple[float, float | None]] = field(default_factory=list, repr=False)

    def log_keys(self) -> dict[str, Any]:
        return {
            "republished": self.republished,
            "lateness": _round(self.lateness),
            "since_notified": _round(self.since_notified),
            "duration": round(self.duration, 6),
        }


class Tally:
    """Accumulates what a sweep republished, batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.observed: list[tuple[float, float | None]] = []

    def add(self, now: datetime, rows: list[tuple[datetime, datetime | None]]) -> None:
        for run_at, notified_at in rows:
            since = None if notified_at is None else (now - _dt(notified_at)).total_seconds()
            lateness = max(0.0, (now - _dt(run_at)).total_seconds())  # --all: future ones
            self.observed.append((lateness, since))
        self.count += len(rows)

    def report(self, duration: float) -> SweepReport:
        late = max((lateness for lateness, _s in self.observed), default=None)
        silent = max((s for _l, s in self.observed if s is not None), default=None)
        return SweepReport(self.count, late, silent, duration, self.observed)


def ready_jobs(conn: Connection, now: datetime) -> Ready:
    """Due, unlocked, unfailed jobs: {(queue, priority): (count, oldest run_at)}."""
    rows = conn.execute(
        select(Job.queue, Job.priority, func.count(), func.min(Job.run_at))
        .where(Job.failed_at.is_(None), Job.locked_at.is_(None), Job.run_at <= now)
        .group_by(Job.queue, Job.priority)
    ).all()
    return {(queue, priority): (count, _dt(oldest)) for queue, priority, count, oldest in rows}


class LagGauge:
    """``tomqueue_queue_lag_seconds``: a level that emptied reads 0, not its last value."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._seen: set[tuple[str, str]] = set()

    def set(self, ready: Ready, now: datetime) -> None:
        ages: dict[tuple[str, str], float] = {}
        for (queue, priority), (_count, oldest) in ready.items():
            key = (queue or self.config.default_queue, self.config.level_for(priority))
            ages[key] = max(ages.get(key, 0.0), (now - oldest).total_seconds())
        for key in self._seen - ages.keys():
            metrics.QUEUE_LAG.labels(*key).set(0)
        for key, age in ages.items():
            metrics.QUEUE_LAG.labels(*key).set(age)
        self._seen |= ages.keys()

    def clear(self) -> None:
        if self._seen:
            metrics.QUEUE_LAG.clear()
            self._seen.clear()


def save_report(engine: Engine, holder: str, report: SweepReport) -> None:
    """Record the sweep in the sweeper lease's row (the holder's only)."""
    with engine.begin() as conn:
        values = {**report.log_keys(), "at": db_now(conn).isoformat()}
        conn.execute(
            update(Lease)
            .where(Lease.name == "sweeper", Lease.holder == holder)
            .values(report=json.dumps(values))
        )


def last_sweep(conn: Connection, now: datetime) -> dict[str, Any] | None:
    """The periodic sweeper's last report (``tomqueue status``), or None."""
    inspector = inspect(conn)
    if not inspector.has_table(Lease.__tablename__):
        return None
    if "report" not in {c["name"] for c in inspector.get_columns(Lease.__tablename__)}:
        return None  # a schema that predates it
    row = conn.execute(select(Lease.holder, Lease.report).where(Lease.name == "sweeper")).first()
    if row is None or not row.report:
        return None
    report = json.loads(row.report)
    return {
        "holder": row.holder,
        "at": report["at"],
        "seconds_ago": round((now - datetime.fromisoformat(report["at"])).total_seconds(), 1),
        "republished": report["republished"],
        "lateness_seconds": report["lateness"],
        "since_notified_seconds": report["since_notified"],
        "duration_seconds": report["duration"],
    }


def _dt(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
