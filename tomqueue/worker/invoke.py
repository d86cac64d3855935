"""Layer 5 — invoke: Delayed::Job's hooks around ``perform``, and the outcome it leads to.

``before`` → ``perform`` → ``success`` | ``error`` → ``after``. A failure reschedules with the
payload's ``reschedule_at(now, attempts)`` or ``attempts**4 + 5`` seconds; when
``max_attempts`` is reached, ``failure`` runs and the job is failed (or deleted when
``destroy_failed_jobs``). A handler that cannot be rebuilt fails at once.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from tomqueue import lifecycle, tracing
from tomqueue.config import Config
from tomqueue.db import utcnow
from tomqueue.schema import Job
from tomqueue.worker import error_handling
from tomqueue.worker.outcome import (
    Failed,
    Outcome,
    Retry,
    Succeeded,
    format_error,
    redact,
    storable,
)
from tomqueue.worker.work import Next, Work

log = logging.getLogger("tomqueue.worker")


def layer(work: Work, call_next: Next | None = None) -> None:
    job = work.job
    assert job is not None
    if work.load_error is not None:
        work.outcome = Failed(work.load_error, _destroy(None, work.ctx.config))
        return
    if work.give_up is not None:
        lifecycle.run("before", "failure", job)
        _safe_hook(work.payload, "failure", job)
        work.outcome = Failed(work.give_up, _destroy(work.payload, work.ctx.config), False)
        return
    started = time.monotonic()
    note = work.note
    attributes = {
        "tomqueue.job_id": job.id,
        "tomqueue.queue": work.queue,
        "tomqueue.attempt": job.attempts + 1,
    }
    try:
        with tracing.perform_span(job.name, note.trace if note else "", attributes):
            perform(job, work.payload)
        work.outcome = Succeeded()
    except Exception as exc:
        work.outcome = failure_outcome(work, exc, time.monotonic() - started)


def perform(job: Job, payload: Any) -> None:
    """Run the hooks and ``perform``; an exception from any of them propagates after the
    ``error`` hook (``after`` always runs)."""
    try:
        lifecycle.run("before", "perform", job, payload)
        _hook(payload, "before", job)
        payload.perform()
        _hook(payload, "success", job)
        lifecycle.run("after", "perform", job, payload)
    except Exception as exc:
        lifecycle.run("before", "error", job, exc)
        _safe_hook(payload, "error", job, exc)
        raise
    finally:
        _safe_hook(payload, "after", job)


def failure_outcome(work: Work, exc: BaseException, elapsed: float) -> Outcome:
    job, payload, config = work.job, work.payload, work.ctx.config
    assert job is not None
    attempts = job.attempts + 1
    job.attempts = attempts
    job.last_error = format_error(exc, _secrets(config))
    log.warning(
        "job %s failed (attempt %s): %s",
        job.id,
        attempts,
        storable(redact(str(exc)[:2000], _secrets(config))),
        extra={**work.log_extra, "action": "error"},
    )
    error_handling.report(work, exc)
    now = (work.locked_at or utcnow()) + timedelta(seconds=elapsed)
    limit = getattr(payload, "max_attempts", None)
    limit = limit if isinstance(limit, int) and limit > 0 else config.max_attempts
    if attempts >= limit:
        lifecycle.run("before", "failure", job)
        _safe_hook(payload, "failure", job)
        return Failed(job.last_error, _destroy(payload, config))
    return Retry(job.last_error, reschedule_at(payload, now, attempts))


def reschedule_at(payload: Any, now: datetime, attempts: int) -> datetime:
    custom = getattr(payload, "reschedule_at", None)
    if callable(custom):
        when = custom(now, attempts)
        if isinstance(when, datetime):
            return when
    return now + timedelta(seconds=attempts**4 + 5)


def run_inline(job: Job, payload: Any, config: Config) -> None:
    """``delay_jobs = False``: run now, in the caller's thread; exceptions propagate."""
    perform(job, payload)


def _destroy(payload: Any, config: Config) -> bool:
    own = getattr(payload, "destroy_failed_jobs", None)
    return own if isinstance(own, bool) else config.destroy_failed_jobs


def _secrets(config: Config) -> tuple[str | None, ...]:
    from urllib.parse import urlsplit

    out: list[str | None] = []
    for url in (config.database_url, config.amqp_url):
        try:
            out.append(urlsplit(url).password if url else None)
        except ValueError:
            continue
    return tuple(out)


def _hook(payload: Any, name: str, *args: Any) -> None:
    fn = getattr(payload, name, None)
    if callable(fn):
        fn(*args)


def _safe_hook(payload: Any, name: str, *args: Any) -> None:
    try:
        _hook(payload, name, *args)
    except Exception:
        log.exception("the %s hook raised", name, extra={"action": f"hook_{name}_failed"})
