"""Must-show 3: duplicate notifications never run a job twice.

The same notification body is published 10 times straight to ``<prefix>.work`` with routing
key ``balance.normal`` and consumed by 3 workers at once: the job is performed once, every
copy is acknowledged, nothing is left in the queue.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import text

import tomqueue
from tests import deferred_jobs, ledger
from tests.conftest import (
    AMQP_STACKS,
    DATABASES,
    Stack,
    WorkerThread,
    declare_topology,
    drain_queue,
    job_count,
    on_stacks,
    publish_raw,
    queue_depth,
    wait_until,
)
from tests.deferred_jobs import Timed
from tests.jobs import Record, Sleepy
from tomqueue.db import get_engine
from tomqueue.enqueue import notification
from tomqueue.registry import Heartbeat
from tomqueue.transport.base import Delivery
from tomqueue.worker import hot_sql, locking
from tomqueue.worker.work import Context, Work

HANDLED = ("succeeded", "skipped_locked", "skipped_missing", "skipped_stale", "skipped_early")


@on_stacks(*AMQP_STACKS)
def test_ten_copies_of_a_notification_run_the_job_once(stack: Stack, ledger_path: str) -> None:
    config = stack.config.replace(read_ahead=1)
    declare_topology(config)
    job = tomqueue.enqueue(Sleepy(ledger_path, "dup", seconds=0.3))
    normal = f"{config.prefix}.balance.normal"
    assert len(drain_queue(config, normal)) == 1  # the enqueue's own notification
    body = notification(job).encode()

    workers = [WorkerThread(config, threads=2).start() for _ in range(3)]
    try:
        wait_until(lambda: queue_depth(config, normal)[1] == 3, 20, "3 consumers on the queue")
        publish_raw(config, body, times=10, headers=notification(job).headers("normal"))

        def handled() -> int:
            return sum(w.counters.get(k, 0) for w in workers for k in HANDLED)

        wait_until(lambda: handled() >= 10, 30, "all 10 copies handled")
    finally:
        for w in workers:
            w.stop()
        codes = [w.join(30) for w in workers]

    assert codes == [0, 0, 0]
    assert ledger.counts(ledger_path, "start") == {"dup": 1}
    assert ledger.counts(ledger_path) == {"dup": 1}
    assert job_count(config) == 0
    assert sum(w.counters.get("succeeded", 0) for w in workers) == 1
    assert queue_depth(config, normal)[0] == 0  # every copy was acked
    # Work was really spread: more than one worker saw a copy.
    assert sum(1 for w in workers if any(w.counters.get(k) for k in HANDLED)) >= 2
    assert not any(w.counters.get("internal_error") for w in workers)


@on_stacks(*AMQP_STACKS)
def test_duplicates_published_before_the_workers_start(stack: Stack, ledger_path: str) -> None:
    """Copies already queued when workers connect (a backlog of duplicates)."""
    config = stack.config
    declare_topology(config)
    job = tomqueue.enqueue(Record(ledger_path, "backlog"))
    publish_raw(config, notification(job).encode(), times=9)

    workers = [WorkerThread(config, threads=2, exit_on_complete=True).start() for _ in range(3)]
    codes = [w.join(30) for w in workers]

    assert codes == [0, 0, 0]
    assert ledger.counts(ledger_path) == {"backlog": 1}
    assert job_count(config) == 0
    assert queue_depth(config, f"{config.prefix}.balance.normal")[0] == 0


@on_stacks(*AMQP_STACKS)
def test_an_early_notification_is_deferred_again_not_run(stack: Stack, ledger_path: str) -> None:
    """A notification that reaches a worker while the job's ``run_at`` is still ahead of the
    database clock by more than ``run_at_tolerance`` (clock skew, a stray copy) is not run:
    it goes back to the deferred queue with the job's ``run_at``."""
    from datetime import timedelta

    from tomqueue.message import decode

    config = stack.config
    declare_topology(config)
    job = tomqueue.enqueue(Record(ledger_path, "future"), run_at=timedelta(minutes=5))
    deferred = f"{config.prefix}.work.deferred"
    assert len(drain_queue(config, deferred)) == 1  # the enqueue's own notification
    publish_raw(config, notification(job).encode(), headers=notification(job).headers("normal"))

    worker = WorkerThread(config, threads=1, exit_on_complete=True).start()
    assert worker.join(30) == 0

    assert ledger.markers(ledger_path) == []
    assert worker.counters.get("skipped_early") == 1
    assert job_count(config) == 1
    [(body, headers)] = drain_queue(config, deferred)
    again = decode(body, headers)
    assert (again.job_id, again.version) == (job.id, job.version)
    assert abs((again.run_at - job.run_at).total_seconds()) < 0.001
    assert queue_depth(config, f"{config.prefix}.balance.normal")[0] == 0


@on_stacks(*AMQP_STACKS)
def test_a_notification_a_little_early_is_taken_and_started_at_run_at(
    stack: Stack, ledger_path: str
) -> None:
    """Within ``run_at_tolerance`` of its ``run_at`` (the deferred manager releases jobs
    ``release_ahead`` early), a job is locked at once and starts at its ``run_at``: not
    before it, and not deferred again."""
    from datetime import timedelta

    config = stack.config
    declare_topology(config)
    job = tomqueue.enqueue(Timed(ledger_path, "soon"), run_at=timedelta(seconds=0.2))
    assert len(drain_queue(config, f"{config.prefix}.work.deferred")) == 1
    publish_raw(config, notification(job).encode(), headers=notification(job).headers("normal"))

    worker = WorkerThread(config, threads=1, exit_on_complete=True, imports=["tests.deferred_jobs"])
    assert worker.start().join(30) == 0

    [start] = deferred_jobs.starts(ledger_path)
    due = deferred_jobs.utc_timestamp(job.run_at)
    assert due <= start.when < due + 0.1, f"started {(start.when - due) * 1000:.1f} ms after"
    assert worker.counters.get("skipped_early") is None and job_count(config) == 0


@on_stacks(*[(d, "polling") for d in DATABASES])
def test_two_lockers_of_one_worker_never_both_take_a_job(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's locker threads lock concurrently. A copy of a notification reaching the
    second locker just after the first locked the job must not be taken again: on MySQL
    the lock statement reads its rows back by the worker's name, which both share."""
    config = stack.config
    job = tomqueue.enqueue(Record(ledger_path, "once"))
    ctx = Context(config, get_engine(config), None, frozenset({"tests.jobs"}), "locker-test")  # type: ignore[arg-type]
    Heartbeat(config, ctx.engine, ctx.name, []).register()  # its locks are held, not dead
    note = notification(job)

    def copy() -> Work:
        work = Work(ctx, Delivery(note.encode(), "normal"))
        work.note = note
        return work

    first, second = copy(), copy()
    sibling: dict[str, set[Work]] = {}
    real_lock_plain = hot_sql.lock_plain
    main = threading.current_thread()

    def lock_then_let_a_sibling_lock(*args: Any) -> Any:
        rows = real_lock_plain(*args)
        if threading.current_thread() is main:  # the first locker, its rows just locked
            thread = threading.Thread(target=lambda: sibling.update(taken=lock(second)))
            thread.start()
            thread.join(1.0)  # a sibling free to lock now would finish here
            threads.append(thread)
        return rows

    def lock(work: Work) -> set[Work]:
        try:
            return locking.lock_batch([work])
        finally:
            ctx.release_connection()

    threads: list[threading.Thread] = []
    monkeypatch.setattr(hot_sql, "lock_plain", lock_then_let_a_sibling_lock)
    assert lock(first) == {first}
    threads[0].join(10)
    assert sibling["taken"] == set()
    assert ctx.running_jobs == {job.id}
    assert ctx.counters == {"skipped_locked": 1}


@on_stacks(*[(d, "polling") for d in DATABASES if d != "sqlite"])
def test_locking_a_job_waits_for_no_other_job(stack: Stack, ledger_path: str) -> None:
    """The lock statement locks only the rows it names. On MariaDB the optimizer walked the
    due index instead (on a small table), so a recorder deleting another finished job held
    up the lock, and the two deadlocked (seen in the W4 benchmark)."""
    config = stack.config
    busy, wanted = (tomqueue.enqueue(Record(ledger_path, m)) for m in ("busy", "wanted"))
    ctx = Context(config, get_engine(config), None, frozenset({"tests.jobs"}), "lock-test")  # type: ignore[arg-type]
    work = Work(ctx, Delivery(notification(wanted).encode(), "normal"))
    work.note = notification(wanted)
    with get_engine(config).connect() as other:
        other.execute(text("DELETE FROM delayed_jobs WHERE id = :id"), {"id": busy.id})
        variable = "lock_timeout" if stack.database == "postgresql" else "innodb_lock_wait_timeout"
        with ctx.connection().use() as conn:  # fail fast instead of the default 50 s
            conn.exec_driver_sql(f"SET SESSION {variable} = 1")
        try:
            assert locking.lock_batch([work]) == {work}
        finally:
            other.rollback()
            with ctx.connection().use() as conn:
                conn.exec_driver_sql(f"SET SESSION {variable} = DEFAULT")
            ctx.release_connection()
