"""Layer 1 — error handling: nothing a job does or a message contains stops the worker.

Anything that escapes the lower layers (database down, broker gone, a bug) is logged with
the job's keys, handed to ``exception_reporter``, and the delivery is given back to the
broker after a short bounded backoff so a struggling dependency is not hammered.
"""

from __future__ import annotations

import logging
import time

from tomqueue.worker.work import Next, Work

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


def layer(work: Work, call_next: Next) -> None:
    try:
        call_next(work)
    except Exception as exc:
        work.ctx.count("internal_error")
        log.exception(
            "worker error while handling a delivery: %s",
            exc,
            extra={**work.log_extra, "action": "internal_error"},
        )
        report(work, exc)
        time.sleep(BACKOFF_SECONDS)
        try:
            work.ctx.consumer.requeue(work.delivery)
        except Exception:
            log.warning(
                "could not requeue the delivery; the broker will redeliver it",
                extra={**work.log_extra, "action": "requeue_failed"},
            )
