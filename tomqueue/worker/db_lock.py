"""Layer 3 — DB lock: the database row is the only lock.

Load the row by primary key (``FOR UPDATE``) and decide, with the database clock:
- missing, failed, or another version than the message's → drop (ack);
- ``run_at`` later than now + ``run_at_tolerance`` → re-defer to ``run_at``;
- locked by a worker that still heartbeats, younger than ``max_run_time`` → a follow-up
  notification for when the lock could expire;
- otherwise lock it: ``locked_at``/``locked_by`` and a new fencing token. Taking over the
  lock of a dead worker counts a crash (and an attempt); past ``max_crashes`` the job is
  failed instead of run.
Then rebuild the payload, run the layers below, and record the outcome (fenced).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from tomqueue import failpoints, handler, metrics
from tomqueue.db import now_sql
from tomqueue.errors import HandlerError
from tomqueue.leases import holder_alive
from tomqueue.message import Notification
from tomqueue.schema import Job, jobs
from tomqueue.worker import outcome
from tomqueue.worker.work import Next, Work

log = logging.getLogger("tomqueue.worker")


def layer(work: Work, call_next: Next) -> None:
    assert work.note is not None
    if not _lock(work):
        return
    assert work.job is not None
    work.ctx.running_jobs.add(work.job.id)
    try:
        _load_payload(work)
        call_next(work)
        if not work.abandoned:  # an abandoned job keeps its lock until the process is gone
            work.follow_ups.extend(outcome.record(work))
    finally:
        work.ctx.running_jobs.discard(work.job.id)
    failpoints.hit("worker.after_record")


def _lock(work: Work) -> bool:
    """Lock through the worker's group commit: concurrent job threads share one
    transaction (``lock_batch``)."""
    return work.ctx.locker.submit(work)


def lock_batch(works: Sequence[Work]) -> list[bool]:
    """Load the batch's rows ``FOR UPDATE`` (in id order: no deadlocks between workers),
    decide for each delivery, lock the ones to run with one statement; one commit."""
    ctx = works[0].ctx
    ids = sorted({_job_id(w) for w in works})
    with ctx.engine.begin() as conn:
        rows = {
            row.id: row
            for row in conn.execute(
                select(jobs, now_sql(ctx.engine.dialect.name).label("db_now"))
                .where(Job.id.in_(ids))
                .order_by(Job.id)
                .with_for_update()
            )
        }
        taken: dict[int, Work] = {}
        plain: list[int] = []
        now = _as_datetime(next(iter(rows.values())).db_now) if rows else None
        for work in works:
            row = rows.get(_job_id(work))
            if _runnable(work, row, conn, taken):
                assert row is not None
                taken[row.id] = work
                if row.locked_at is None:
                    plain.append(row.id)
                else:  # taking over from a worker that died holding it: one of its own
                    _take_over(conn, work, row, now)
        if plain:  # the rows are locked by this transaction: fence + 1 is what we read + 1
            conn.execute(
                update(Job)
                .where(Job.id.in_(plain))
                .values(locked_at=now, locked_by=ctx.name, fence=Job.fence + 1, updated_at=now)
            )
    for job_id, work in taken.items():
        _hold(work, rows[job_id], now)
    return [taken.get(_job_id(w)) is w for w in works]


def _job_id(work: Work) -> int:
    assert work.note is not None
    return work.note.job_id


def _runnable(work: Work, row: Any, conn: Connection, taken: dict[int, Work]) -> bool:
    note, ctx = work.note, work.ctx
    assert note is not None
    skip = _why_not(work, row, conn)
    if skip is None and note.job_id in taken:  # a duplicate of a delivery in this batch
        recheck = _as_datetime(row.db_now) + timedelta(seconds=ctx.config.lease_timeout)
        skip = ("locked", _follow_up(row, recheck))
    if skip is None:
        return True
    reason, follow_up = skip
    if follow_up is not None:
        work.follow_ups.append(follow_up)
    ctx.count(f"skipped_{reason}")
    metrics.SKIPPED.labels(reason).inc()
    log.info(
        "job %s not taken: %s",
        note.job_id,
        reason,
        extra={"job_id": note.job_id, "action": f"skip_{reason}"},
    )
    return False


def _take_over(conn: Connection, work: Work, row: Any, now: Any) -> None:
    work.takeover = _crash_counts(work, row)
    conn.execute(
        update(Job)
        .where(Job.id == row.id, Job.fence == row.fence)
        .values(
            locked_at=now,
            locked_by=work.ctx.name,
            fence=row.fence + 1,
            updated_at=now,
            **work.takeover,
        )
    )


def _hold(work: Work, row: Any, now: Any) -> None:
    """Fill in the work from the row as this worker's lock left it."""
    values = {c.name: getattr(row, c.name) for c in jobs.columns}
    values.update(locked_at=now, locked_by=work.ctx.name, fence=row.fence + 1)
    values.update(work.takeover or {})
    work.job = Job(**values)
    work.fence = row.fence + 1
    work.locked_at = now
    _after_lock(work)


def _after_lock(work: Work) -> None:
    assert work.job is not None and work.locked_at is not None
    work.started = time.monotonic()
    run_at = _as_datetime(work.job.run_at)
    metrics.WAIT_SECONDS.labels(work.queue).observe(
        max(0.0, (work.locked_at - run_at).total_seconds())
    )
    failpoints.hit("worker.after_lock")


def _crash_counts(work: Work, row: Any) -> dict[str, Any]:
    """A crash counts as an attempt and, past ``max_crashes``, fails the job."""
    crashes, limit = row.crashes + 1, work.ctx.config.max_crashes
    error = (
        f"WorkerCrashed: worker {row.locked_by!r} stopped while running this job "
        f"(locked at {row.locked_at} UTC); crash {crashes} of at most {limit}"
    )
    log.warning("job %s: %s", row.id, error, extra={"job_id": row.id, "action": "crashed"})
    if crashes >= limit:
        work.give_up = f"{error}: giving up"
    return {"crashes": crashes, "attempts": row.attempts + 1, "last_error": error}


def _why_not(work: Work, row: Any, conn: Connection) -> tuple[str, Notification | None] | None:
    note, config = work.note, work.ctx.config
    assert note is not None
    if row is None:
        return "missing", None
    if row.failed_at is not None:
        return "failed", None
    if row.version != note.version:
        return "stale", None
    now = _as_datetime(row.db_now)
    if row.locked_at is not None:
        expires = row.locked_at + timedelta(seconds=config.max_run_time)
        if expires > now and holder_alive(conn, row.locked_by, now, config):
            # check again when the lock would expire, or when a dead holder's lease would
            recheck = min(expires, now + timedelta(seconds=config.lease_timeout))
            return "locked", _follow_up(row, recheck)
    if row.run_at > now + timedelta(seconds=config.run_at_tolerance):
        return "early", _follow_up(row, row.run_at)
    return None


def _follow_up(row: Any, run_at: datetime) -> Notification:
    return Notification(
        row.id, row.version, run_at, row.priority, row.queue, handler.handler_kind(row.handler)
    )


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value


def _load_payload(work: Work) -> None:
    assert work.job is not None
    try:
        work.payload = handler.load(work.job.handler, work.ctx.allowed_modules)
    except HandlerError as exc:
        work.load_error = f"HandlerError: {exc}"
        log.error(
            "job %s has a handler this worker will not load: %s",
            work.job.id,
            exc,
            extra={**work.log_extra, "action": "bad_handler"},
        )
