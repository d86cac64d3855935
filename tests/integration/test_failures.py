"""Must-show 6: a failing job is retried like Delayed::Job, then failed (or destroyed).

- attempts incremented, ``run_at`` ≈ database now + attempts**4 + 5 s, ``last_error`` with
  the message and the traceback, version bumped, lock released;
- on AMQP stacks the retry's notification goes to ``<prefix>.work.deferred`` (run_at is in
  the future) and nothing is left in the work queues;
- after ``max_attempts`` the payload's ``failure`` hook runs once and ``failed_at`` is set,
  or the row is deleted when ``destroy_failed_jobs``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

import tomqueue
from tests import ledger
from tests.conftest import (
    AMQP_STACKS,
    DATABASES,
    Stack,
    all_queue_names,
    declare_topology,
    drain_queue,
    job_count,
    on_stacks,
    queue_depth,
    run_worker,
    wait_until,
)
from tests.jobs import Boom, Record
from tomqueue.db import db_now, get_engine
from tomqueue.enqueue import notification
from tomqueue.message import Notification, decode
from tomqueue.registry import Heartbeat
from tomqueue.schema import Job
from tomqueue.transport.base import Delivery
from tomqueue.worker import db_lock, locking, outcome, pipeline
from tomqueue.worker.outcome import Retry, Succeeded
from tomqueue.worker.work import Context, Work


def load(config: tomqueue.Config, job_id: int) -> Job | None:
    with get_engine(config).connect() as conn:
        row = conn.execute(select(Job.__table__).where(Job.id == job_id)).first()
    return None if row is None else Job(**row._asdict())


def make_due(config: tomqueue.Config, job_id: int) -> None:
    with get_engine(config).begin() as conn:
        past = db_now(conn) - timedelta(seconds=1)
        conn.execute(update(Job).where(Job.id == job_id).values(run_at=past))


def assert_backoff(row: Job, attempts: int) -> None:
    """run_at ≈ the database time of the outcome (updated_at) + attempts**4 + 5 s."""
    delay = (row.run_at - row.updated_at).total_seconds()
    expected = attempts**4 + 5
    assert expected - 1.0 <= delay <= expected + 0.5, (delay, expected)


def test_failed_attempt_is_rescheduled_with_backoff(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    if stack.transport == "amqp":
        declare_topology(config)
    job = tomqueue.enqueue(Boom(ledger_path, "b1", message="kaboom"))

    worker = run_worker(config, threads=1)

    row = load(config, job.id)
    assert row is not None
    assert row.attempts == 1
    assert row.failed_at is None
    assert row.locked_at is None and row.locked_by is None
    assert row.version == job.version + 1
    assert row.last_error is not None
    assert "ValueError: kaboom (b1)" in row.last_error
    assert "Traceback (most recent call last)" in row.last_error
    assert "in perform" in row.last_error
    assert_backoff(row, 1)
    with get_engine(config).connect() as conn:
        now = db_now(conn)
    assert timedelta(seconds=3) < row.run_at - now <= timedelta(seconds=6.5)
    assert ledger.counts(ledger_path) == {"b1": 1}
    assert worker.counters.get("retry") == 1

    if stack.transport == "amqp":
        for name in all_queue_names(config):
            assert queue_depth(config, name)[0] == 0, name
        deferred = drain_queue(config, f"{config.prefix}.work.deferred")
        assert len(deferred) == 1
        note = decode(deferred[0][0], deferred[0][1])
        assert (note.job_id, note.version) == (job.id, job.version + 1)
        assert abs((note.run_at - row.run_at).total_seconds()) < 0.001

    # The second attempt backs off 2**4 + 5 = 21 s.
    make_due(config, job.id)
    assert tomqueue.work_off(5) == (0, 1)
    row = load(config, job.id)
    assert row is not None and row.attempts == 2 and row.version == job.version + 2
    assert_backoff(row, 2)
    assert ledger.counts(ledger_path) == {"b1": 2}


@on_stacks(*AMQP_STACKS)
def test_work_off_publishes_the_retry_notification(stack: Stack, ledger_path: str) -> None:
    """work_off is a worker too: a retry's new notification must reach the broker, or the
    job waits for a sweep although nothing failed."""
    config = stack.config
    declare_topology(config)
    job = tomqueue.enqueue(Boom(ledger_path, "w1"))
    drain_queue(config, f"{config.prefix}.balance.normal")  # the enqueue notification

    assert tomqueue.work_off(1) == (0, 1)

    deferred = drain_queue(config, f"{config.prefix}.work.deferred")
    assert [(decode(b, h).job_id, decode(b, h).version) for b, h in deferred] == [
        (job.id, job.version + 1)
    ]


def test_max_attempts_runs_failure_hook_and_sets_failed_at(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    job = tomqueue.enqueue(Boom(ledger_path, "m1", max_attempts=3, retry_now=True))
    other = tomqueue.enqueue(Record(ledger_path, "ok"), priority=5)

    assert tomqueue.work_off(10) == (1, 3)

    row = load(config, job.id)
    assert row is not None
    assert row.attempts == 3
    assert row.failed_at is not None
    assert row.locked_at is None and row.locked_by is None
    assert row.last_error and "ValueError: boom (m1)" in row.last_error
    assert ledger.counts(ledger_path) == {"m1": 3, "ok": 1}
    assert ledger.counts(ledger_path, "failure") == {"m1": 1}
    assert load(config, other.id) is None
    # A failed job is never run again.
    assert tomqueue.work_off(10) == (0, 0)


def test_config_max_attempts_applies_when_payload_has_none(stack: Stack, ledger_path: str) -> None:
    config = stack.config.replace(max_attempts=2)
    tomqueue.configure(config)
    job = tomqueue.enqueue(Boom(ledger_path, "c1", retry_now=True))

    assert tomqueue.work_off(10, config=config) == (0, 2)

    row = load(config, job.id)
    assert row is not None and row.attempts == 2 and row.failed_at is not None
    assert ledger.counts(ledger_path, "failure") == {"c1": 1}


@pytest.mark.parametrize("where", ["payload", "config"])
def test_destroy_failed_jobs_deletes_the_row(stack: Stack, ledger_path: str, where: str) -> None:
    config = stack.config
    if where == "payload":
        payload = Boom(ledger_path, "d1", max_attempts=1, destroy_failed_jobs=True)
    else:
        config = config.replace(destroy_failed_jobs=True)
        tomqueue.configure(config)
        payload = Boom(ledger_path, "d1", max_attempts=1)
    job = tomqueue.enqueue(payload)

    assert tomqueue.work_off(5, config=config) == (0, 1)

    assert load(config, job.id) is None
    assert job_count(config) == 0
    assert ledger.counts(ledger_path, "failure") == {"d1": 1}


def test_payload_destroy_false_overrides_config(stack: Stack, ledger_path: str) -> None:
    config = stack.config.replace(destroy_failed_jobs=True)
    tomqueue.configure(config)
    job = tomqueue.enqueue(Boom(ledger_path, "k1", max_attempts=1, destroy_failed_jobs=False))

    assert tomqueue.work_off(5, config=config) == (0, 1)

    row = load(config, job.id)
    assert row is not None and row.failed_at is not None


Kept = tuple[Context, Any, Any, list[Notification]]


def kept_outcomes(config: tomqueue.Config, ledger_path: str, mp: pytest.MonkeyPatch) -> Kept:
    """Two jobs locked by a worker, one succeeded and one to retry in an hour, whose
    outcomes could not be written (the database stayed unreachable through the retries)."""
    done = tomqueue.enqueue(Record(ledger_path, "done"))
    failing = tomqueue.enqueue(Record(ledger_path, "failing"))
    published: list[Notification] = []
    consumer = SimpleNamespace(publish=published.extend)
    ctx = Context(config, get_engine(config), consumer, frozenset({"tests.jobs"}), "late-test")
    Heartbeat(config, ctx.engine, ctx.name, []).register()
    first, second = locked(ctx, done), locked(ctx, failing)
    first.outcome = Succeeded()
    retry_at = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)
    second.outcome = Retry("Boom: failed", retry_at)

    def unreachable(works: Any) -> Any:
        raise OperationalError("UPDATE", {}, Exception("server has gone away (injected)"))

    with mp.context() as patched:
        patched.setattr(outcome, "record_batch", unreachable)
        with pytest.raises(OperationalError):
            db_lock.leave([first, second], lambda batch: None)
    ctx.release_connection()
    assert len(ctx.unrecorded) == 2
    assert ctx.running_jobs == {done.id, failing.id}  # still ours: locked, not run again
    return ctx, done, failing, published


def locked(ctx: Context, job: Any) -> Work:
    work = Work(ctx, Delivery(b"", "normal"))
    work.note = notification(job)
    assert locking.lock_batch([work]) == {work}
    return work


def assert_written(kept: Kept) -> None:
    ctx, done, failing, published = kept
    assert ctx.unrecorded == [] and ctx.running_jobs == set()
    with get_engine(ctx.config).connect() as conn:
        left = {row.id: row for row in conn.execute(select(Job))}
    assert done.id not in left  # success: deleted
    assert left[failing.id].attempts == 1 and left[failing.id].locked_by is None
    assert [(n.job_id, n.version) for n in published] == [(failing.id, failing.version + 1)]


@on_stacks(*[(d, "polling") for d in DATABASES])
def test_an_outcome_that_could_not_be_written_is_written_with_the_next_batch(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job stays locked by this worker (a redelivered copy is not taken) and its
    outcome is written before the next batch's, its follow-up notification published then."""
    kept = kept_outcomes(stack.config, ledger_path, monkeypatch)
    ctx, done = kept[0], kept[1]
    copy = Work(ctx, Delivery(b"", "normal"))  # the given-back delivery, redelivered
    copy.note = notification(done)
    assert locking.lock_batch([copy]) == set()

    later = Work(ctx, Delivery(b"", "normal"))  # the next batch: a job that was not taken
    db_lock.leave([later], lambda batch: None)
    ctx.release_connection()
    assert_written(kept)


@on_stacks(*[(d, "polling") for d in DATABASES])
def test_an_idle_worker_writes_a_kept_outcome_without_waiting_for_a_job(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = kept_outcomes(stack.config, ledger_path, monkeypatch)
    monkeypatch.setattr(pipeline, "LATE_RETRY_SECONDS", 0.05)
    line = pipeline.Pipeline(kept[0], 1, lambda: None)
    line.start()
    try:
        wait_until(lambda: not kept[0].unrecorded, 10, "the kept outcomes to be written")
    finally:
        line.stop()
    assert_written(kept)
