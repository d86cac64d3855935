"""Must-show 2: a ready ``high`` job runs before a ``normal`` one enqueued earlier.

One single-threaded worker, started after both jobs are enqueued, over the full matrix.
"""

from __future__ import annotations

import tomqueue
from tests import ledger
from tests.conftest import Stack, WorkerThread, job_count, run_worker, wait_until
from tests.jobs import Record, Sleepy


def test_high_priority_job_runs_before_earlier_normal_job(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    assert config.level_for(-1) == "high" and config.level_for(0) == "normal"
    tomqueue.enqueue(Record(ledger_path, "normal-first"), priority=0)
    tomqueue.enqueue(Record(ledger_path, "normal-second"), priority=0)
    tomqueue.enqueue(Record(ledger_path, "high"), priority=-1)

    run_worker(config, threads=1)

    assert ledger.markers(ledger_path) == ["high", "normal-first", "normal-second"]
    assert job_count(config) == 0


def test_levels_run_most_urgent_first(stack: Stack, ledger_path: str) -> None:
    """bulk, low, normal, high enqueued in that order run as high, normal, low, bulk."""
    for priority, marker in ((10, "bulk"), (1, "low"), (0, "normal"), (-5, "high")):
        tomqueue.enqueue(Record(ledger_path, marker), priority=priority)

    run_worker(stack.config, threads=1)

    assert ledger.markers(ledger_path) == ["high", "normal", "low", "bulk"]
    assert job_count(stack.config) == 0


def test_high_job_overtakes_normal_jobs_already_buffered(stack: Stack, ledger_path: str) -> None:
    """While a single-threaded worker is busy and holds prefetched normal deliveries, a
    high job enqueued later still runs next."""
    config = stack.config
    tomqueue.enqueue(Sleepy(ledger_path, "busy", seconds=0.7), priority=0)
    for i in range(6):
        tomqueue.enqueue(Record(ledger_path, f"n{i}"), priority=0)
    worker = WorkerThread(config, threads=1).start()
    try:
        wait_until(lambda: ledger.counts(ledger_path, "start")["busy"], 20, "the busy job")
        tomqueue.enqueue(Record(ledger_path, "high"), priority=-1)
        wait_until(lambda: len(ledger.markers(ledger_path)) == 8, 20, "all jobs")
    finally:
        worker.stop()
        assert worker.join(20) == 0

    assert ledger.markers(ledger_path) == ["busy", "high"] + [f"n{i}" for i in range(6)]
