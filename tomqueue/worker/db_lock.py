"""Layer 3 — DB lock: the database row is the only lock.

Load the row by primary key (``FOR UPDATE``) and decide, with the database clock:
- missing, failed, or another version than the message's → drop (ack);
- ``run_at`` later than now + ``run_at_tolerance`` → re-defer to ``run_at``;
- locked by a worker that still heartbeats, younger than ``max_run_time`` → a follow-up
  notification for when the lock could expire;
- otherwise lock it: ``locked_at``/``locked_by`` and a new fencing token. Taking over the
  lock of a dead worker counts a crash (and an attempt); past ``max_crashes`` the job is
  failed instead of run. A job locked before its ``run_at`` (within the tolerance: the
  deferred manager releases jobs ``release_ahead`` early) starts at its ``run_at``
  (``work.start_at``, kept by the timeout layer).
Then rebuild the payload and run the layers below; on the way back up, record the outcomes
(fenced), all of a batch in one transaction. How a batch is locked: ``locking.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

from tomqueue import failpoints, handler
from tomqueue.db import utcnow
from tomqueue.errors import HandlerError
from tomqueue.message import Notification
from tomqueue.worker import outcome
from tomqueue.worker.locking import lock_batch
from tomqueue.worker.work import Batch, BatchNext, Context, Work

log = logging.getLogger("tomqueue.worker")


def enter(batch: Batch, call_next: BatchNext) -> None:
    """Lock what can run (one transaction for the batch); the rest stops here, with the
    follow-up notification it calls for."""
    if not batch[0].ctx.lease_valid():  # our locks may soon be taken over: take none
        for work in batch:
            work.stop("lease_in_danger")
            work.follow_ups.append(_retry_soon(work))
        return
    taken = lock_batch(batch)
    for work in batch:
        if work in taken:
            _load_payload(work)
        else:
            work.stop("not_taken")
    if taken:
        call_next([work for work in batch if work in taken])


def leave(batch: Batch, call_next: BatchNext) -> None:
    """Record the outcomes of the jobs that ran (fenced, one transaction). Outcomes that
    could not be written (the database stayed unreachable through the retries) are kept
    and written before the next batch's: the job stays locked by this worker meanwhile."""
    ran = [w for w in batch if w.job is not None and w.outcome is not None]
    if batch:
        record_late(batch[0].ctx)
    if ran:
        try:
            recorded = _record(ran)
        except Exception:
            ctx = ran[0].ctx
            with ctx.lock:
                ctx.unrecorded.extend(ran)
            raise
        for work, follow_ups in zip(ran, recorded, strict=True):
            work.follow_ups.extend(follow_ups)
        failpoints.hit("worker.after_record")
    call_next(batch)


def _record(works: Batch) -> list[list[Notification]]:
    """Write the outcomes (one transaction); the jobs are no longer ours to run."""
    recorded = outcome.record_batch(works)
    for work in works:
        work.ctx.running_jobs.discard(work.job.id)  # type: ignore[union-attr]
    return recorded


def record_at_exit(ctx: Context) -> None:
    """A last try at outcomes that could not be written; what is still unwritten is run
    again after this worker's lease expires (counted as a crash)."""
    if not ctx.unrecorded:
        return
    try:
        record_late(ctx)
    finally:
        ctx.release_connection()
    if ctx.unrecorded:
        log.error(
            "exiting with %d outcome(s) unwritten (jobs %s); they run again once this "
            "worker's lease expires",
            len(ctx.unrecorded),
            sorted(w.job.id for w in ctx.unrecorded if w.job is not None),
            extra={"action": "outcome_lost"},
        )


def record_late(ctx: Context) -> None:
    """Write the outcomes kept after a failed recording; publish their follow-ups (their
    deliveries were given back long ago)."""
    if not ctx.unrecorded:  # the common case, on every batch: no lock taken
        return
    with ctx.lock:
        pending, ctx.unrecorded = ctx.unrecorded, []
    if not pending:
        return
    try:
        recorded = _record(pending)
    except Exception as exc:
        with ctx.lock:
            ctx.unrecorded[:0] = pending
        log.warning(
            "%d outcome(s) still cannot be written (%s); their jobs stay locked",
            len(pending),
            type(exc).__name__,
            extra={"action": "outcome_pending", "jobs": len(pending)},
        )
        return
    log.info(
        "wrote %d outcome(s) kept since an earlier failure",
        len(pending),
        extra={"action": "outcome_late", "jobs": len(pending)},
    )
    try:
        ctx.consumer.publish([note for follow_ups in recorded for note in follow_ups])
    except Exception as exc:  # the sweeper delivers a due retry whose notice was lost
        log.warning(
            "follow-up notifications of late outcomes not published: %s",
            exc,
            extra={"action": "publish_failed"},
        )


def _retry_soon(work: Work) -> Notification:
    note = work.note
    assert note is not None
    return dataclasses.replace(note, run_at=utcnow() + timedelta(seconds=1))


def _load_payload(work: Work) -> None:
    assert work.job is not None
    try:
        work.payload = handler.load(work.job.handler, work.ctx.allowed_modules)
    except Exception as exc:  # HandlerError, or a bug of ours: the job cannot be rebuilt
        kind = "HandlerError" if isinstance(exc, HandlerError) else type(exc).__name__
        work.load_error = f"{kind}: {exc}"
        log.error(
            "job %s has a handler this worker will not load: %s",
            work.job.id,
            exc,
            extra={**work.log_extra, "action": "bad_handler"},
        )
