"""Layer 4 — timeout: the job runs in a runner thread that this layer watches.

- ``min(payload.max_run_time, config.max_run_time)`` passed → ``JobTimeout`` is raised inside
  the job (an asynchronous exception). If the job ignores it for ``timeout_grace`` seconds,
  its attempt is counted at once but the job stays locked until its thread ends (see
  ``_abandon``): a thread cannot be killed, and the job must never run twice at once. A
  process with more such threads than job threads asks to be restarted.
- The worker is stopping and ``stop_grace`` has passed → the job is interrupted the same way
  and released (unlocked, attempt not counted) so it runs again promptly elsewhere.
- The heartbeat could not renew the worker's lease → the job is interrupted and released
  before other workers may take it over.
- ``delivery_hold_limit`` passed → the delivery is acked early (see the pop layer).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from tomqueue.db import utcnow
from tomqueue.errors import JobTimeout
from tomqueue.worker.invoke import failure_outcome
from tomqueue.worker.outcome import (
    Failed,
    Outcome,
    Released,
    Retry,
    count_attempt_keeping_lock,
    record,
)
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
    inner = dataclasses.replace(work)  # an abandoned thread writes only to its own copy
    done = threading.Event()
    crash: list[BaseException] = []
    later: list[Callable[[], None]] = []  # what to do when an abandoned thread ends
    finish_lock = threading.Lock()

    def runner() -> None:
        try:
            try:
                call_next(inner)
            except WorkerStopping:
                pass
            except BaseException as exc:  # SystemExit and friends raised by a job
                crash.append(exc)
        finally:
            with finish_lock:
                done.set()
            for callback in later:
                callback()

    started = time.monotonic()
    deadline = started + max_run_time(work)
    thread = RUNNERS.run(runner)
    interrupted = _watch(work, done, deadline)
    if interrupted is None:
        work.outcome = inner.outcome or failure_outcome(
            work,
            crash[0] if crash else RuntimeError("the job ended without an outcome"),
            time.monotonic() - started,
        )
        return
    with finish_lock:  # never into a runner that already finished (it may be idle by now)
        if not done.is_set():
            _interrupt(thread, interrupted)
    done.wait(_grace(work))
    with finish_lock:
        if not done.is_set():
            _abandon(work, thread, started)  # exits at once if our lease is in danger
            later.append(lambda: _release_abandoned(work))
            return
    work.outcome = _interrupted_outcome(work, inner.outcome, interrupted, started)


def _interrupted_outcome(
    work: Work, outcome: Outcome | None, interrupted: type[BaseException], started: float
) -> Outcome:
    """The outcome of a job that stopped after being interrupted."""
    if interrupted is WorkerStopping:
        return Released("the worker stopped before the job finished")
    if isinstance(outcome, Retry | Failed):  # say why, above the traceback
        return dataclasses.replace(outcome, error=f"{_timeout_text(work)}\n{outcome.error}")
    # it swallowed the interruption: the attempt counts all the same
    return failure_outcome(work, JobTimeout(_timeout_text(work)), time.monotonic() - started)


class _Runner(threading.Thread):
    """A reusable thread that runs jobs for the timeout layer (no thread start per job)."""

    def __init__(self, pool: RunnerPool) -> None:
        super().__init__(name="tomqueue-runner", daemon=True)
        self.tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.pool = pool

    def run(self) -> None:
        while True:
            try:
                _clear_interruption(self)
                self.tasks.get()()
            except BaseException:
                pass
            self.pool.give_back(self)


class RunnerPool:
    def __init__(self) -> None:
        self._idle: list[_Runner] = []
        self._lock = threading.Lock()

    def run(self, task: Callable[[], None]) -> threading.Thread:
        with self._lock:
            runner = self._idle.pop() if self._idle else None
        if runner is None:
            runner = _Runner(self)
            runner.start()
        runner.tasks.put(task)
        return runner

    def give_back(self, runner: _Runner) -> None:
        with self._lock:
            self._idle.append(runner)


RUNNERS = RunnerPool()


def _clear_interruption(thread: threading.Thread) -> None:
    """Drop an asynchronous exception still pending for this thread (NULL clears it)."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)


def _watch(work: Work, done: threading.Event, deadline: float) -> type[BaseException] | None:
    """Wait for the job; return the exception type to interrupt it with, or None if done."""
    ctx = work.ctx
    while True:
        now = time.monotonic()
        wake = deadline
        if work.hold_deadline is not None and work.on_long_run is not None:
            if now >= work.hold_deadline:
                work.on_long_run()
                work.on_long_run = None
            else:
                wake = min(wake, work.hold_deadline)
        if not ctx.lease_valid():
            return WorkerStopping  # other workers may take the job over soon: stop it now
        if ctx.stop_deadline is not None:
            if now >= ctx.stop_deadline:
                return WorkerStopping
            wake = min(wake, ctx.stop_deadline)
        # notice a stop request or a lease in danger well within the lease margin
        wake = min(wake, now + min(1.0, ctx.config.heartbeat_interval / 4))
        if now >= deadline:
            return JobTimeout
        if done.wait(max(0.0, wake - now)):
            return None


def _timeout_text(work: Work) -> str:
    return f"execution expired: the job ran longer than max_run_time ({max_run_time(work):g} s)"


def _interrupt(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    if thread.ident is None:
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
    )


def _grace(work: Work) -> float:
    """How long an interrupted job may take to stop. With the lease in danger, only as
    long as the lease margin allows: past it, other workers may take the job over."""
    config = work.ctx.config
    if work.ctx.lease_valid():
        return config.timeout_grace
    return min(config.timeout_grace, config.heartbeat_interval / 2)


def _abandon(work: Work, thread: threading.Thread, started: float) -> None:
    """The job ignores its interruption (blocked in one long call, or swallowing it). A
    thread cannot be killed, so the job must not run elsewhere while this thread lives: the
    failed attempt is counted now but the row stays locked by this worker; when the thread
    ends at last, the job is released for its retry (``_release_abandoned``). Past more
    abandoned threads than job threads the worker exits for a restart, keeping its registry
    row, so the lock lapses only ``lease_timeout`` after the process is gone. If the lease
    is already in danger (database unreachable), the process exits at once: the only way to
    be sure the job never runs twice at the same time."""
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
    elapsed = time.monotonic() - started
    work.outcome = failure_outcome(work, JobTimeout(_timeout_text(work)), elapsed)
    work.abandoned_at = (work.locked_at or utcnow()) + timedelta(seconds=elapsed)
    error = work.outcome.error if isinstance(work.outcome, Retry | Failed) else ""
    count_attempt_keeping_lock(work, error)
    log.error(
        "job thread %s ignored its interruption; its attempt is counted and the job stays "
        "locked until the thread ends",
        thread.name,
        extra={**work.log_extra, "action": "thread_abandoned"},
    )


def _release_abandoned(work: Work) -> None:
    """In the abandoned thread, once it ends: record the retry (or failure) decided at
    abandonment, without counting the attempt twice, and publish its notification."""
    outcome = work.outcome
    if isinstance(outcome, Retry):  # the backoff starts now, when the job is released
        delay = outcome.run_at - (work.abandoned_at or outcome.run_at)
        outcome = dataclasses.replace(outcome, run_at=utcnow() + delay)
    if isinstance(outcome, Retry | Failed):
        work.outcome = dataclasses.replace(outcome, count_attempt=False)
    try:
        work.ctx.consumer.publish(record(work))
    except Exception:
        log.exception(
            "could not release job %s after its thread ended; it is recovered when the "
            "worker's lease lapses",
            work.job.id if work.job else "?",
        )
    finally:
        with work.ctx.lock:
            work.ctx.abandoned_threads -= 1
