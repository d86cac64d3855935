"""Must-show 7: a job that runs past ``max_run_time`` is stopped, counted as a failed
attempt, and the worker keeps working — also when the job ignores the interruption."""

from __future__ import annotations

import time

from sqlalchemy import select

import tomqueue
from tests import ledger
from tests.conftest import Stack, on_stacks, run_worker, since
from tests.jobs import Record, Sleepy, Slow, Stubborn
from tomqueue.db import get_engine
from tomqueue.schema import Job

STACKS = (("sqlite", "polling"), ("postgresql", "amqp"), ("mysql", "amqp"))


def row(config: tomqueue.Config, job_id: int) -> Job:
    with get_engine(config).connect() as conn:
        found = conn.execute(select(Job.__table__).where(Job.id == job_id)).first()
    assert found is not None, f"job {job_id} was deleted"
    return Job(**found._asdict())


def released(config: tomqueue.Config, job_id: int) -> None:
    """Wait (bounded) until an abandoned job's thread ended and the job was released."""
    ledger.wait_for(
        lambda: row(config, job_id).locked_at is None,
        15,
        0.1,
        f"job {job_id} to be released when its thread ends",
    )


def assert_timed_out_attempt(job: Job) -> None:
    assert job.attempts == 1
    assert job.failed_at is None  # attempts left: rescheduled
    assert job.locked_at is None and job.locked_by is None
    assert job.version == 2
    assert job.last_error is not None
    assert "JobTimeout" in job.last_error
    delay = (job.run_at - job.updated_at).total_seconds()
    assert 4.0 <= delay <= 6.5, delay  # 1**4 + 5 s after the failed attempt


@on_stacks(*STACKS)
def test_job_past_max_run_time_is_stopped_and_counted(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    slow = tomqueue.enqueue(Slow(ledger_path, "slow", seconds=30), priority=-1)
    tomqueue.enqueue(Record(ledger_path, "next"), priority=0)

    started = time.monotonic()
    worker = run_worker(config, threads=1, timeout=20)

    assert since(started) < 10, "the slow job was not stopped at its max_run_time of 1 s"
    assert_timed_out_attempt(row(config, slow.id))
    assert ledger.counts(ledger_path, "start") == {"slow": 1}
    assert ledger.markers(ledger_path) == ["next"]  # slow never completed; next ran
    assert worker.counters.get("retry") == 1 and worker.counters.get("succeeded") == 1


@on_stacks(*STACKS)
def test_job_ignoring_the_interruption_is_still_counted(stack: Stack, ledger_path: str) -> None:
    """The job swallows JobTimeout (``except Exception`` in a loop) for longer than
    ``timeout_grace``: its thread is abandoned, the attempt is recorded as failed, and the
    single-threaded worker goes on to the next job."""
    config = stack.config
    assert config.timeout_grace == 1.0
    stubborn = tomqueue.enqueue(Stubborn(ledger_path, "stubborn", seconds=4), priority=-1)
    tomqueue.enqueue(Record(ledger_path, "next"), priority=0)

    worker = run_worker(config, threads=1, timeout=20)

    # The attempt is counted at once, but the job stays locked while its thread still runs
    # (no second run may start meanwhile); it is released for its retry when the thread ends.
    counted = row(config, stubborn.id)
    assert counted.attempts == 1 and "JobTimeout" in (counted.last_error or "")
    released(config, stubborn.id)
    assert_timed_out_attempt(row(config, stubborn.id))
    assert ledger.counts(ledger_path, "ignored-JobTimeout") == {"stubborn": 1}
    assert ledger.markers(ledger_path) == ["next"]
    assert worker.counters.get("retry") == 1 and worker.counters.get("succeeded") == 1


@on_stacks(("postgresql", "polling"))
def test_job_ignoring_the_interruption_with_spare_threads(stack: Stack, ledger_path: str) -> None:
    """Same with two job threads: one abandoned thread, the worker keeps both slots busy."""
    config = stack.config
    stubborn = tomqueue.enqueue(Stubborn(ledger_path, "stubborn", seconds=4), priority=-1)
    for i in range(4):
        tomqueue.enqueue(Record(ledger_path, f"next{i}"), priority=0)

    worker = run_worker(config, threads=2, timeout=20)

    released(config, stubborn.id)
    assert_timed_out_attempt(row(config, stubborn.id))
    assert sorted(ledger.markers(ledger_path)) == [f"next{i}" for i in range(4)]
    assert worker.counters.get("succeeded") == 4


@on_stacks(("sqlite", "polling"))
def test_timeout_last_error_explains_max_run_time(stack: Stack, ledger_path: str) -> None:
    slow = tomqueue.enqueue(Slow(ledger_path, "slow", seconds=30))

    run_worker(stack.config, threads=1, timeout=20)

    error = row(stack.config, slow.id).last_error or ""
    assert "max_run_time" in error and "1 s" in error, error


@on_stacks(("sqlite", "polling"))
def test_the_workers_max_run_time_caps_jobs_without_their_own(
    stack: Stack, ledger_path: str
) -> None:
    """``min(payload.max_run_time, config.max_run_time)``: the worker's setting applies to a
    payload without ``max_run_time`` and caps a payload that asks for more."""
    config = stack.config.replace(max_run_time=1.0)
    tomqueue.configure(config)
    plain = tomqueue.enqueue(Sleepy(ledger_path, "plain", seconds=30))
    greedy_payload = Sleepy(ledger_path, "greedy", seconds=30)
    greedy_payload.max_run_time = 3600  # type: ignore[attr-defined]
    greedy = tomqueue.enqueue(greedy_payload)

    started = time.monotonic()
    worker = run_worker(config, threads=2, timeout=20)

    assert since(started) < 10, "max_run_time of the worker (1 s) was not enforced"
    for job in (plain, greedy):
        stopped = row(config, job.id)
        assert stopped.attempts == 1 and "JobTimeout" in (stopped.last_error or "")
        assert "max_run_time (1 s)" in (stopped.last_error or "")
    assert ledger.markers(ledger_path) == []  # neither completed
    assert worker.counters.get("retry") == 2
