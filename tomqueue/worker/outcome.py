"""What happened to a job, and the one place where that is written to the database.

Every write is conditioned on the fencing token the lock produced (``fence``) and bumps it,
so a worker that lost its lock (timed out, abandoned thread) cannot overwrite a newer
outcome: its write matches no row and is reported as such.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Update, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from tomqueue import metrics
from tomqueue.db import now_sql
from tomqueue.message import Notification
from tomqueue.schema import Job
from tomqueue.worker import hot_sql

if TYPE_CHECKING:
    from tomqueue.worker.work import Work

log = logging.getLogger("tomqueue.worker")

MAX_ERROR_CHARS = 65_000
RECORD_RETRY_SECONDS = 30.0
# bounded repetitions: a long token in a message must not make this quadratic
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}://[^:/@\s]{0,256}:)[^@\s]{1,256}@")


@dataclass(frozen=True)
class Succeeded:
    """perform() returned: the row is deleted."""


@dataclass(frozen=True)
class Retry:
    """A failed attempt with attempts left: run again at ``run_at``."""

    error: str
    run_at: datetime
    count_attempt: bool = True


@dataclass(frozen=True)
class Failed:
    """No attempts left (or a permanent error): mark failed, or delete if ``destroy``."""

    error: str
    destroy: bool
    count_attempt: bool = True


@dataclass(frozen=True)
class Released:
    """The worker stopped before the job finished: unlock it, attempt not counted."""

    reason: str


Outcome = Succeeded | Retry | Failed | Released


def format_error(exc: BaseException, secrets: tuple[str | None, ...] = ()) -> str:
    """``Type: message`` and the traceback, without passwords, bounded in size, and storable
    in every database (NUL bytes and lone surrogates escaped)."""
    text = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-30:])
    # cut before redacting (bounded work), with a margin so no secret is cut in half
    text = redact(text[: MAX_ERROR_CHARS + 1024], secrets)[:MAX_ERROR_CHARS]
    return storable(text)


def storable(text: str) -> str:
    """Text every database accepts: PostgreSQL refuses NUL, no UTF-8 codec takes a lone
    surrogate (``\\udcff`` from a wrongly decoded byte)."""
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    text = _URL_PASSWORD.sub(r"\1***@", text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def record_batch(works: Sequence[Work]) -> list[list[Notification]]:
    """Write every outcome of the batch on the thread's own connection, retried on
    connection errors (the outcome is known; only writing it is left): successes in one
    ``DELETE``, the others one ``UPDATE`` each. Returns the follow-ups to publish."""
    planned = [_plan(work) for work in works]
    held = works[0].ctx.connection()
    written: dict[int, bool] = {}  # index -> the fenced write matched the row
    for attempt in Retrying(
        retry=retry_if_exception(_transient),
        wait=wait_exponential(multiplier=0.2, max=5) + wait_random(0, 0.2),
        stop=stop_after_delay(RECORD_RETRY_SECONDS),
        reraise=True,
    ):
        with attempt:
            todo = [i for i in range(len(works)) if i not in written]
            this_try: dict[int, bool] = {}
            with held.use() as conn:  # autocommit: each statement is final when it returns
                for i, ok in _write(conn, works, planned, todo):
                    (written if held.autocommit else this_try)[i] = ok
            written.update(this_try)
    return [
        _report(work, written[i], follow_up)
        for i, (work, (_, follow_up)) in enumerate(zip(works, planned, strict=True))
    ]


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the connection or the server failed, not the statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def _write(
    conn: Connection, works: Sequence[Work], planned: list[Planned], todo: list[int]
) -> Iterator[tuple[int, bool]]:
    deletions = [i for i in todo if planned[i][0] is None]
    if deletions:
        deleted = _delete_all(conn, [works[i] for i in deletions])
        yield from ((i, _job_id(works[i]) in deleted) for i in deletions)
    for i in todo:
        statement = planned[i][0]
        if statement is not None:
            yield i, _update(conn, works[i], statement)


def _update(conn: Connection, work: Work, statement: Update) -> bool:
    """One fenced outcome; a value the database refuses (it should not happen: errors are
    cleaned by ``format_error``) is replaced by a plain explanation rather than lost."""
    try:
        return conn.execute(statement).rowcount == 1
    except DBAPIError as exc:
        if _transient(exc):
            raise
        log.error(
            "job %s: the database refused its outcome (%s); recording it without the error text",
            _job_id(work),
            type(exc.orig or exc).__name__,
            extra={**work.log_extra, "action": "outcome_refused"},
        )
        plain = f"the error text could not be stored: {type(exc.orig or exc).__name__}"
        return conn.execute(statement.values(last_error=plain)).rowcount == 1


def count_attempt_keeping_lock(work: Work, error: str) -> bool:
    """Count a failed attempt now, while the job stays locked (its thread still runs)."""
    assert work.job is not None
    with work.ctx.engine.begin() as conn:
        return bool(
            conn.execute(
                update(Job)
                .where(Job.id == work.job.id, Job.fence == work.fence)
                .values(attempts=Job.attempts + 1, last_error=error)
            ).rowcount
        )


def _job_id(work: Work) -> int:
    assert work.job is not None
    return work.job.id


def _delete_all(conn: Connection, works: Sequence[Work]) -> set[int]:
    """Delete the works' rows where the fence still matches; the ids actually deleted."""
    return hot_sql.delete_done(conn, [(_job_id(w), w.fence) for w in works])


Planned = tuple[Update | None, Notification | None]


def _plan(work: Work) -> Planned:
    """The statement that records the outcome (None: a plain deletion, done in bulk) and
    the follow-up notification it calls for."""
    job, outcome = work.job, work.outcome
    assert job is not None and outcome is not None
    if isinstance(outcome, Succeeded) or (isinstance(outcome, Failed) and outcome.destroy):
        return None, None  # a plain deletion, done in bulk
    mine = (Job.id == job.id) & (Job.fence == work.fence)
    now = now_sql(work.ctx.engine.dialect.name)
    unlock = {"locked_at": None, "locked_by": None, "fence": Job.fence + 1, "updated_at": now}
    if isinstance(outcome, Retry):
        values = dict(
            attempts=Job.attempts + int(outcome.count_attempt),
            last_error=outcome.error,
            run_at=outcome.run_at,
            version=Job.version + 1,
            notified_at=now,
        )
        return update(Job).where(mine).values(**values, **unlock), _note(
            work, job.version + 1, outcome.run_at
        )
    if isinstance(outcome, Failed):
        values = dict(
            attempts=Job.attempts + int(outcome.count_attempt),
            last_error=outcome.error,
            failed_at=now,
        )
        return update(Job).where(mine).values(**values, **unlock), None
    values = dict(version=Job.version + 1, notified_at=now)  # Released
    return update(Job).where(mine).values(**values, **unlock), _note(
        work, job.version + 1, job.run_at
    )


def _report(work: Work, written: bool, follow_up: Notification | None) -> list[Notification]:
    assert work.job is not None
    action = type(work.outcome).__name__.lower()
    if not written:
        log.warning(
            "job %s: lock was lost before recording %s; outcome discarded",
            work.job.id,
            action,
            extra={**work.log_extra, "action": "fence_lost"},
        )
        return []
    work.ctx.count(action)
    metrics.JOBS.labels(action, work.queue).inc()
    duration = time.monotonic() - work.started
    metrics.RUN_SECONDS.labels(work.queue).observe(duration)
    log.info(
        "job %s %s in %.3fs",
        work.job.id,
        action,
        duration,
        extra={**work.log_extra, "action": action, "duration": round(duration, 6)},
    )
    return [follow_up] if follow_up else []


def _note(work: Work, version: int, run_at: datetime) -> Notification:
    job = work.job
    assert job is not None
    trace = work.note.trace if work.note is not None else ""
    return Notification(job.id, version, run_at, job.priority, job.queue, job.name, trace)
