"""Layer 4 — timeout: the job runs in this job thread, watched by the watchdog.

- A job locked before its ``run_at`` (the deferred manager releases jobs ``release_ahead``
  early; a clock may be a little ahead) starts at its ``run_at``: by this host's clock,
  kept within the lock statement's round trip of the database clock (``StartAt``).
- ``min(payload.max_run_time, config.max_run_time)`` passed → ``JobTimeout`` is raised inside
  the job (an asynchronous exception) and the attempt counts as failed. If the job ignores
  it for ``timeout_grace`` seconds, it is *abandoned* (``abandon``): its attempt is counted
  at once, its delivery acked and its place taken by a new job thread, but the row stays
  locked until the thread ends (a thread cannot be killed, and a job must never run twice
  at once); then the job is released for its retry. A process with more abandoned threads
  than job threads asks to be restarted.
- The worker is stopping and ``stop_grace`` has passed → the job is interrupted the same way
  and released (unlocked, attempt not counted) so it runs again promptly elsewhere.
- The heartbeat could not renew the worker's lease → the job is interrupted and released
  before other workers may take it over.
- ``delivery_hold_limit`` passed → the delivery is acked early (see the pop layer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from datetime import timedelta

from tomqueue.db import utcnow
from tomqueue.errors import JobTimeout
from tomqueue.worker.invoke import failure_outcome
from tomqueue.worker.outcome import Failed, Outcome, Released, Retry, count_attempt_keeping_lock
from tomqueue.worker.watchdog import Slot, clear_interruption
from tomqueue.worker.work import Next, Work

log = logging.getLogger("tomqueue.worker")

EXIT_ABANDONED = 3  # the process exits for a restart (supervisors restart it)


class WorkerStopping(BaseException):
    """Raised inside a job that is interrupted because its worker is shutting down.

    A BaseException, so a job's ``except Exception`` does not swallow it."""


def max_run_time(work: Work) -> float:
    limit = work.ctx.config.max_run_time
    own = getattr(work.payload, "max_run_time", None)
    if isinstance(own, int | float) and not isinstance(own, bool) and 0 < own < limit:
        return float(own)
    return limit


def layer(work: Work, call_next: Next) -> None:
    if not _due(work):
        work.outcome = Released("the worker stopped before the job was due")
        return
    watchdog = work.ctx.watchdog
    assert watchdog is not None
    now = time.monotonic()
    hold = work.delivery.received_at + work.ctx.config.delivery_hold_limit
    slot = watchdog.watch(work, now + max_run_time(work), hold)
    crash: BaseException | None = None
    try:
        try:
            call_next(work)
        except BaseException as exc:  # SystemExit and friends raised by a job, interruptions
            crash = exc
        finally:
            slot.finish()
            clear_interruption()
    except BaseException:  # the interruption was raised just as the job returned
        slot.finish()
        clear_interruption()
    watchdog.unwatch(slot)
    work.outcome = _decide(work, slot, crash)


def _due(work: Work) -> bool:
    """Wait for the job's ``run_at`` if it was locked a little before (False: the worker
    is stopping; the job is released to run elsewhere, at its time)."""
    start = work.start_at
    if start is None:
        return True
    while (left := start.seconds_left()) > 0:
        if work.ctx.stopping.wait(left):
            return False
    work.started = time.monotonic()  # its run time is counted from here, not from the lock
    return True


def _decide(work: Work, slot: Slot, crash: BaseException | None) -> Outcome:
    elapsed = time.monotonic() - slot.started
    if slot.abandoned:
        slot.abandon_done.wait()
        return _released_after_abandon(work)
    if slot.interrupted is WorkerStopping:
        return Released("the worker stopped before the job finished")
    if slot.interrupted is JobTimeout:
        if isinstance(work.outcome, Retry | Failed) and crash is None:  # say why, first
            error = f"{_timeout_text(work)}\n{work.outcome.error}"
            return dataclasses.replace(work.outcome, error=error)
        # it swallowed the interruption: the attempt counts all the same
        return failure_outcome(work, JobTimeout(_timeout_text(work)), elapsed)
    if crash is not None:
        return failure_outcome(work, crash, elapsed)
    return work.outcome or failure_outcome(work, RuntimeError("no outcome"), elapsed)


def attend(slot: Slot, now: float) -> float:
    """The watchdog's decision for one running job; returns when to look again."""
    ctx = slot.work.ctx
    if slot.interrupted is None:
        stop = ctx.stop_deadline if ctx.stop_deadline is not None else math.inf
        if now >= stop or not ctx.lease_valid():
            slot.interrupt(WorkerStopping)
        elif now >= slot.deadline:
            slot.interrupt(JobTimeout)
        else:
            if now >= slot.hold_deadline:
                _ack_early(slot)
            return min(slot.deadline, slot.hold_deadline, stop)
    if slot.interrupted is not None and not slot.abandoned:
        give_up = slot.interrupted_at + _grace(slot.work)
        if now < give_up:
            return give_up
        if slot.mark_abandoned():
            try:
                abandon(slot)
            finally:
                slot.abandon_done.set()
    return math.inf


def _ack_early(slot: Slot) -> None:
    slot.hold_deadline = math.inf
    work = slot.work
    work.ctx.consumer.ack_many([work.delivery])
    log.info(
        "acknowledged the delivery of a long-running job early",
        extra={**work.log_extra, "action": "early_ack"},
    )


def _timeout_text(work: Work) -> str:
    return f"execution expired: the job ran longer than max_run_time ({max_run_time(work):g} s)"


def _grace(work: Work) -> float:
    """How long an interrupted job may take to stop. With the lease in danger, only as
    long as the lease margin allows: past it, other workers may take the job over."""
    config = work.ctx.config
    if work.ctx.lease_valid():
        return config.timeout_grace
    return min(config.timeout_grace, config.heartbeat_interval / 2)


def abandon(slot: Slot) -> None:
    """The job ignores its interruption (blocked in one long call, or swallowing it). A
    thread cannot be killed, so the job must not run elsewhere while this thread lives: the
    failed attempt is counted now but the row stays locked by this worker; when the thread
    ends at last, the job is released for its retry (``_released_after_abandon``). Past more
    abandoned threads than job threads the worker exits for a restart, keeping its registry
    row, so the lock lapses only ``lease_timeout`` after the process is gone. If the lease
    is already in danger (database unreachable), the process exits at once: the only way to
    be sure the job never runs twice at the same time."""
    work = slot.work
    if not work.ctx.lease_valid():
        log.critical(
            "lease in danger with a job that ignores its interruption: exiting",
            extra={**work.log_extra, "action": "exit_now"},
        )
        logging.shutdown()
        os._exit(EXIT_ABANDONED)
    with work.ctx.lock:
        work.ctx.abandoned_threads += 1
    work.abandoned = True
    elapsed = time.monotonic() - slot.started
    outcome = failure_outcome(work, JobTimeout(_timeout_text(work)), elapsed)
    work.abandoned_outcome = outcome
    work.abandoned_at = (work.locked_at or utcnow()) + timedelta(seconds=elapsed)
    error = outcome.error if isinstance(outcome, Retry | Failed) else ""
    count_attempt_keeping_lock(work, error)
    work.ctx.consumer.ack_many([work.delivery])
    log.error(
        "a job thread ignored its interruption; its attempt is counted and the job stays "
        "locked until the thread ends",
        extra={**work.log_extra, "action": "thread_abandoned"},
    )


def _released_after_abandon(work: Work) -> Outcome:
    """Once the abandoned thread ends: the retry (or failure) decided at abandonment,
    without counting the attempt twice; the backoff starts now, at the release."""
    outcome = work.abandoned_outcome
    assert outcome is not None
    if isinstance(outcome, Retry):
        delay = outcome.run_at - (work.abandoned_at or outcome.run_at)
        outcome = dataclasses.replace(outcome, run_at=utcnow() + delay)
    if isinstance(outcome, Retry | Failed):
        outcome = dataclasses.replace(outcome, count_attempt=False)
    return outcome
