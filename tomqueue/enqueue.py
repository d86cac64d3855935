"""The enqueue stack: validate → hooks → persist → publish after commit.

    enqueue(payload, priority=None, run_at=None, queue=None, session=None, connection=None)

Returns once the row is committed (or written in the caller's transaction) and its
notification is handed to the background publisher, which publishes it with confirms once
the row is committed; ``flush()`` waits for those confirms. ``sync_publish=True``
makes ``enqueue`` wait for the confirm itself.

Delayed::Job's precedence: an explicit ``priority`` (0 included) wins over the configured
default; the queue comes from the argument, then the payload's ``queue_name``, then the
default queue (stored as NULL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from tomqueue import failpoints, handler, lifecycle, tracing
from tomqueue.aftercommit import after_commit
from tomqueue.config import QUEUE_NAME_RE, Config, current
from tomqueue.db import STATEMENT_MARGIN, statement_limit, utcnow
from tomqueue.errors import EnqueueError
from tomqueue.message import Notification
from tomqueue.persist import persist, persist_many
from tomqueue.runtime import collector_paused
from tomqueue.schema import Job, bare_job
from tomqueue.transport import get_publisher
from tomqueue.transport.background import get_background_publisher

log = logging.getLogger("tomqueue.enqueue")

MAX_HANDLER_BYTES = 16 * 1024 * 1024


class Request(NamedTuple):
    """A validated enqueue request (a tuple: a fifth of a frozen dataclass's cost to make)."""

    payload: Any
    priority: int
    run_at: datetime
    queue: str | None
    handler: str
    kind: str  # the payload's module:QualName (named in the notification's headers)


# --- layer 1: validate -----------------------------------------------------------------


def validate(
    payload: Any,
    priority: int | None,
    run_at: Any,
    queue: str | None,
    config: Config,
    now: datetime | None = None,
) -> Request:
    """``now``: the moment a relative or missing ``run_at`` counts from (default: the
    clock now; ``enqueue_many`` gives its batch one moment)."""
    if priority is None:
        priority = getattr(payload, "priority", None)
        priority = config.default_priority if not isinstance(priority, int) else priority
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise EnqueueError(f"priority must be an integer, got {priority!r}")
    if queue is None:
        queue = getattr(payload, "queue_name", None)
    if queue is not None and (not isinstance(queue, str) or not QUEUE_NAME_RE.match(queue)):
        raise EnqueueError(f"queue must be 1-64 letters, digits, '_' or '-', got {queue!r}")
    if queue == config.default_queue:
        queue = None
    kind, text = handler.dump_with_kind(payload)
    if len(text) > MAX_HANDLER_BYTES or len(text) > _database_limit(config):
        raise EnqueueError(
            f"the handler of {type(payload).__name__} is {len(text)} bytes; the limit is "
            f"{min(MAX_HANDLER_BYTES, _database_limit(config))}{_limit_reason(config)}: "
            "store large data elsewhere and pass a key"
        )
    return Request(payload, priority, _normalize_time(run_at, now), queue, text, kind)


def _database_limit(config: Config) -> int:
    packet = statement_limit(config) if config.delay_jobs else None
    return MAX_HANDLER_BYTES if packet is None else packet - STATEMENT_MARGIN


def _limit_reason(config: Config) -> str:
    if _database_limit(config) < MAX_HANDLER_BYTES:
        return " (the database's max_allowed_packet less room for the rest of the statement)"
    return ""


def _normalize_time(run_at: Any, now: datetime | None = None) -> datetime:
    if isinstance(run_at, datetime):
        if run_at.tzinfo is not None:
            return run_at.astimezone(UTC).replace(tzinfo=None)
        return run_at  # naive datetimes are UTC
    if run_at is None:
        delay = timedelta()
    elif isinstance(run_at, timedelta):
        delay = run_at
    elif isinstance(run_at, int | float) and not isinstance(run_at, bool):
        delay = timedelta(seconds=run_at)
    else:
        raise EnqueueError(
            f"run_at must be a datetime (naive = UTC), a timedelta or seconds, got {run_at!r}"
        )
    return (now or utcnow()) + delay


# --- layer 2: hooks --------------------------------------------------------------------


def run_enqueue_hooks(request: Request, job: Job) -> None:
    lifecycle.run("before", "enqueue", job)
    hook = getattr(request.payload, "enqueue", None)
    if callable(hook):
        hook(job)
    lifecycle.run("after", "enqueue", job)


# --- layer 3: persist (tomqueue/persist.py) --------------------------------------------


def new_job(request: Request, now: datetime | None = None, tracked: bool = False) -> Job:
    """A new, unsaved ``Job``. ``tracked``: it goes into a caller's ``Session``, whose flush
    must see every value set through the ORM; otherwise the values go straight into the
    instance (a tenth of the cost; the row is written by our own INSERT)."""
    now = now or utcnow()
    values = {
        "priority": request.priority,
        "attempts": 0,
        "handler": request.handler,
        "run_at": request.run_at,
        "queue": request.queue,
        "created_at": now,
        "updated_at": now,
        "version": 1,
        "fence": 0,
        "notified_at": now,
        "crashes": 0,
    }
    return Job(**values) if tracked else bare_job(values)


# --- layer 4: publish after commit -----------------------------------------------------


def notification(job: Job, trace: str = "", kind: str = "") -> Notification:
    """The job's notification; ``kind``: its payload's kind when the caller knows it (read
    from the handler otherwise)."""
    return Notification(  # by position: a third faster than by keyword
        job.id,
        job.version,
        job.run_at,
        job.priority,
        job.queue,
        kind or handler.handler_kind(job.handler),
        trace,
    )


def publish(notes: list[Notification], config: Config) -> None:
    """Hand the notifications to this process's background publisher (or, with
    ``sync_publish`` or without a broker, publish them and wait for the confirms). A failure
    is logged, not raised: the row is committed and the sweeper republishes notifications
    that never arrived."""
    try:
        failpoints.hit("enqueue.before_publish")
        if config.uses_broker and not config.sync_publish:
            get_background_publisher(config).submit(notes)
        else:
            get_publisher(config).publish(notes)
    except Exception as exc:  # the row is committed: never raise, the sweeper recovers it
        log.error(
            "job committed but its notification was not confirmed: %s; the sweeper "
            "will republish it",
            exc,
            extra={"action": "publish_failed", "job_id": notes[0].job_id},
        )
        if config.exception_reporter:
            config.exception_reporter(exc)


def flush(timeout: float | None = None) -> bool:
    """Wait until every notification this process's ``enqueue`` calls handed off so far is
    confirmed by the broker or given up (logged, left to the sweeper). True if they were
    all confirmed; False if one was given up or ``timeout`` (seconds) passed first.
    Called for a few seconds at interpreter exit as well."""
    from tomqueue.transport import flush_publishers

    return flush_publishers(timeout)


# --- the stack -------------------------------------------------------------------------


def enqueue(
    payload: Any,
    priority: int | None = None,
    run_at: Any = None,
    queue: str | None = None,
    *,
    session: Session | None = None,
    connection: Connection | None = None,
    config: Config | None = None,
) -> Job:
    """Persist a job and notify workers once it is committed. Returns the job."""
    config = config or current()
    now = utcnow()  # created_at, and run_at unless given
    request = validate(payload, priority, run_at, queue, config, now)
    job = new_job(request, now, tracked=session is not None)
    if not config.delay_jobs:
        from tomqueue.worker.invoke import run_inline

        run_enqueue_hooks(request, job)
        run_inline(job, request.payload, config)
        return job
    run_enqueue_hooks(request, job)
    target = session if session is not None else connection
    kind = _kind(request, job)
    if tracing.active():
        with tracing.enqueue_span(kind):
            return _store(job, kind, target, config, tracing.current_traceparent())
    return _store(job, kind, target, config)


def _kind(request: Request, job: Job) -> str:
    """The stored handler's kind: the payload's, unless a hook rewrote the handler."""
    return request.kind if job.handler is request.handler else handler.handler_kind(job.handler)


def _store(
    job: Job, kind: str, target: Session | Connection | None, config: Config, trace: str = ""
) -> Job:
    """Layers 3 and 4 for one job: persist, then publish after the commit."""
    persist(job, target, config)
    note = notification(job, trace, kind)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "enqueued job %s",
            job.id,
            extra={"job_id": job.id, "queue": job.queue, "action": "enqueue"},
        )
    if target is None:
        publish([note], config)
    else:
        after_commit(target, lambda: publish([note], config))
    return job


def enqueue_many(
    payloads: Iterable[Any],
    priority: int | None = None,
    run_at: Any = None,
    queue: str | None = None,
    *,
    session: Session | None = None,
    connection: Connection | None = None,
    config: Config | None = None,
) -> list[Job]:
    """``enqueue`` for many payloads: one INSERT, one commit, notifications published
    together with many confirms in flight. The same rules and hooks apply to each. The
    garbage collector is paused while the batch is stored (``runtime.collector_paused``);
    not while jobs run inline (``delay_jobs=False``)."""
    config = config or current()
    with collector_paused() if config.delay_jobs else nullcontext():
        now = utcnow()  # one moment for the batch: created_at, and run_at unless given
        requests = [validate(p, priority, run_at, queue, config, now) for p in payloads]
        new = [new_job(r, now, tracked=session is not None) for r in requests]
        for request, job in zip(requests, new, strict=True):
            run_enqueue_hooks(request, job)
        if not config.delay_jobs:
            from tomqueue.worker.invoke import run_inline

            for request, job in zip(requests, new, strict=True):
                run_inline(job, request.payload, config)
            return new
        if not new:
            return new
        target = session if session is not None else connection
        with tracing.enqueue_span(f"{len(new)} jobs") if tracing.active() else nullcontext():
            persist_many(new, target, config)
            trace = tracing.current_traceparent() if tracing.active() else ""
        notes = [
            notification(job, trace, _kind(r, job)) for r, job in zip(requests, new, strict=True)
        ]
    if target is None:  # the collector runs again: a synchronous publish waits for confirms
        publish(notes, config)
    else:
        after_commit(target, lambda: publish(notes, config))
    return new
