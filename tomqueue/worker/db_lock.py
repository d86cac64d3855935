"""Layer 3 — DB lock: the database row is the only lock.

Load the row by primary key (``FOR UPDATE``) and decide, with the database clock:
- missing, failed, or another version than the message's → drop (ack);
- ``run_at`` later than now + ``run_at_tolerance`` → re-defer to ``run_at``;
- locked and the lock younger than ``max_run_time`` → a follow-up at the lock's expiry;
- otherwise lock it: ``locked_at``/``locked_by`` and a new fencing token.
Then rebuild the payload, run the layers below, and record the outcome (fenced).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from tomqueue import handler
from tomqueue.db import now_sql
from tomqueue.errors import HandlerError
from tomqueue.message import Notification
from tomqueue.schema import Job, jobs
from tomqueue.worker import outcome
from tomqueue.worker.work import Next, Work

log = logging.getLogger("tomqueue.worker")


def layer(work: Work, call_next: Next) -> None:
    assert work.note is not None
    if not _lock(work):
        return
    _load_payload(work)
    call_next(work)
    work.follow_ups.extend(outcome.record(work))


def _lock(work: Work) -> bool:
    note, ctx = work.note, work.ctx
    assert note is not None
    dialect = ctx.engine.dialect.name
    with ctx.engine.begin() as conn:
        row = conn.execute(
            select(jobs, now_sql(dialect).label("db_now"))
            .where(Job.id == note.job_id)
            .with_for_update()
        ).first()
        skip = _why_not(work, row)
        if skip is not None:
            reason, follow_up = skip
            if follow_up is not None:
                work.follow_ups.append(follow_up)
            ctx.count(f"skipped_{reason}")
            log.info(
                "job %s not taken: %s",
                note.job_id,
                reason,
                extra={"job_id": note.job_id, "action": f"skip_{reason}"},
            )
            return False
        assert row is not None
        db_now = _as_datetime(row.db_now)
        conn.execute(
            update(Job)
            .where(Job.id == row.id, Job.fence == row.fence)
            .values(locked_at=db_now, locked_by=ctx.name, fence=row.fence + 1, updated_at=db_now)
        )
    values = {c.name: getattr(row, c.name) for c in jobs.columns}
    values.update(locked_at=db_now, locked_by=ctx.name, fence=row.fence + 1)
    work.job = Job(**values)
    work.fence = row.fence + 1
    work.locked_at = db_now
    return True


def _why_not(work: Work, row: Any) -> tuple[str, Notification | None] | None:
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
        if expires > now:
            return "locked", _follow_up(row, expires)
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
