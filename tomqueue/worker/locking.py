"""How the DB lock layer (``db_lock.py``) locks a batch: the plain path — one statement
for every due, unlocked, unfailed job of the message's version — and the checked path for
what it did not take: load the rows ``FOR UPDATE``, decide for each delivery with the
database clock (missing, failed, stale, locked by a live worker, early), take over the
locks of dead workers (a crash counts), and lock the rest with one statement. A job locked
before its ``run_at`` gets its ``work.start_at``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from tomqueue import failpoints, handler, metrics
from tomqueue.db import now_sql
from tomqueue.leases import holder_alive
from tomqueue.message import Notification
from tomqueue.schema import Job, bare_job, jobs
from tomqueue.worker import hot_sql
from tomqueue.worker.work import StartAt, Work

log = logging.getLogger("tomqueue.worker")


def lock_batch(works: Sequence[Work]) -> set[Work]:
    """Lock the jobs of a batch that can run; the others get their follow-ups.

    The common case — due, unlocked, unfailed, the message's version — is one statement on
    the thread's own connection (``_lock_plain``). What it did not take goes through the
    checked path (``_lock_checked``), which finds out why and takes over dead locks.

    The jobs taken join ``running_jobs`` before another locker thread of this worker may
    lock one of these ids: on MySQL the plain path reads its locks back by the worker's
    name, and would otherwise also claim a row a sibling locker has just locked (both would
    run it). Batches with no id in common lock concurrently (``Claims``)."""
    ctx = works[0].ctx
    with ctx.claims.hold({_job_id(w) for w in works}):
        taken = _lock_plain(works)
        rest = [w for w in works if w not in taken]
        if rest:
            taken |= _lock_checked(rest)
        ctx.running_jobs.update(_job_id(w) for w in taken)
    return taken


def _lock_plain(works: Sequence[Work]) -> set[Work]:
    ctx = works[0].ctx
    firsts: dict[int, Work] = {}
    for work in works:  # a duplicate delivery in the same batch goes the checked way
        firsts.setdefault(_job_id(work), work)
    pairs = [(job_id, w.note.version) for job_id, w in firsts.items()]  # type: ignore[union-attr]
    running = set(ctx.running_jobs)  # locked already; and MySQL reads back by our name
    pairs = [p for p in pairs if p[0] not in running]
    if not pairs:
        return set()
    sent = time.monotonic()
    with ctx.connection().use() as conn:
        rows = hot_sql.lock_plain(conn, ctx.name, pairs, ctx.config.run_at_tolerance)
    for row in rows:
        _hold(firsts[row["id"]], row, sent)
    return {firsts[row["id"]] for row in rows}


def _lock_checked(works: Sequence[Work]) -> set[Work]:
    """Load the rows ``FOR UPDATE`` (in id order: no deadlocks between two of these; one
    with another worker's batch ``UPDATE``, which takes rows in the table's order, is
    rolled back by the database and given back by ``error_handling``), decide for each
    delivery, lock the ones to run with one statement; one commit."""
    ctx = works[0].ctx
    ids = sorted({_job_id(w) for w in works})
    sent = time.monotonic()
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
        row = rows[job_id]
        values = {c.name: getattr(row, c.name) for c in jobs.columns}
        values.update(locked_at=now, locked_by=ctx.name, fence=row.fence + 1)
        values.update(work.takeover or {})
        _hold(work, values, sent)
    return set(taken.values())


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


def _hold(work: Work, values: dict[str, Any], sent: float) -> None:
    """Fill in the work from the row as this worker's lock left it (``sent``: monotonic
    time before the lock statement)."""
    work.job = bare_job(values)
    work.fence = values["fence"]
    work.locked_at = _as_datetime(values["locked_at"])
    _after_lock(work, sent)


def _after_lock(work: Work, sent: float) -> None:
    assert work.job is not None and work.locked_at is not None
    work.started = time.monotonic()
    run_at = _as_datetime(work.job.run_at)
    due_in = (run_at - work.locked_at).total_seconds()
    if due_in > 0:
        unix = run_at.replace(tzinfo=UTC).timestamp()
        work.start_at = StartAt(sent + due_in, work.started + due_in, unix)
    metrics.WAIT_SECONDS.labels(work.queue).observe(max(0.0, -due_in))
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
