"""Layer 1 — error handling: nothing a job does or a message contains stops the worker.

Anything that escapes the layers below, on the way down or back up (database down, broker
gone, a bug), is logged with the jobs' keys and handed to ``exception_reporter``; after a
short bounded backoff, so a struggling dependency is not hammered, the deliveries that were
not yet handed to a job are given back to the broker.

A lock conflict between workers — the database chose this transaction as a deadlock's
victim or refused it a serializable snapshot, and rolled it back — is contention, not an
error: the deliveries are given back at once with a warning (``action=lock_conflict``) and
taken again, as both databases advise.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tomqueue.db import first_line
from tomqueue.worker.work import Batch, BatchNext, Work

log = logging.getLogger("tomqueue.worker")

BACKOFF_SECONDS = 1.0
CONFLICT_SQLSTATES = {"40P01", "40001"}  # PostgreSQL: deadlock, serialization failure
CONFLICT_MYSQL_ERRORS = {1213}  # MySQL/MariaDB: deadlock found when trying to get lock


def report(work: Work, exc: BaseException) -> None:
    reporter = work.ctx.config.exception_reporter
    if reporter is None:
        return
    try:
        reporter(exc)
    except Exception:
        log.exception("exception_reporter failed", extra={"action": "report_failed"})


def enter(batch: Batch, call_next: BatchNext) -> None:
    try:
        call_next(batch)
    except Exception as exc:
        _give_back(batch, exc, "while taking jobs")


def leave(batch: Batch, call_next: BatchNext) -> None:
    try:
        call_next(batch)
    except Exception as exc:
        _give_back(batch, exc, "while recording outcomes")


def lock_conflict(exc: BaseException) -> bool:
    """The database rolled the transaction back to resolve a conflict with another one."""
    driver_error = getattr(exc, "orig", None)
    if getattr(driver_error, "sqlstate", None) in CONFLICT_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(driver_error, "args", None) or ()
    return bool(args) and args[0] in CONFLICT_MYSQL_ERRORS


def _give_back(batch: Batch, exc: Exception, when: str) -> None:
    first = batch[0]
    if lock_conflict(exc):
        first.ctx.count("lock_conflict")
        log.warning(
            "lock conflict with another worker %s (%d deliveries given back): %s",
            when,
            len(batch),
            first_line(exc),
            extra={**first.log_extra, "action": "lock_conflict"},
        )
    else:
        first.ctx.count("internal_error")
        log.exception(
            "worker error %s (%d deliveries): %s",
            when,
            len(batch),
            exc,
            extra={**first.log_extra, "action": "internal_error"},
        )
        report(first, exc)
        time.sleep(BACKOFF_SECONDS)
    for work in batch:
        work.requeued = True
        try:
            work.ctx.consumer.requeue(work.delivery)
        except Exception:
            log.warning(
                "could not requeue the delivery; the broker will redeliver it",
                extra={**work.log_extra, "action": "requeue_failed"},
            )
