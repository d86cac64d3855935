"""Layer 1 — error handling: nothing a job does or a message contains stops the worker.

Anything that escapes the layers below, on the way down or back up (database down, broker
gone, a bug), is logged with the jobs' keys and handed to ``exception_reporter``; after a
short bounded backoff, so a struggling dependency is not hammered, the deliveries that were
not yet handed to a job are given back to the broker.
"""

from __future__ import annotations

import logging
import time

from tomqueue.worker.work import Batch, BatchNext, Work

log = logging.getLogger("tomqueue.worker")

BACKOFF_SECONDS = 1.0


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


def _give_back(batch: Batch, exc: Exception, when: str) -> None:
    first = batch[0]
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
