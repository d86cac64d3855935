"""Issue 4, leases and fencing, in-process:

- the worker registry row (host, pid, queues, started_at, last_seen, current jobs) is what
  the heartbeat keeps fresh, and it is removed when the worker stops;
- a worker whose lock was taken over while its job ran (the fencing token moved on) cannot
  record its outcome over the new holder's: the write matches no row and is discarded;
- the sweeper's named lease lets one holder at a time sweep.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, update

import tomqueue
from tests import ledger
from tests.conftest import Stack, WorkerThread, on_stacks, wait_until
from tests.jobs import Sleepy
from tomqueue.db import db_now, get_engine
from tomqueue.leases import try_acquire
from tomqueue.registry import Heartbeat
from tomqueue.schema import Job, WorkerRecord

STACKS = (("sqlite", "polling"), ("postgresql", "amqp"), ("mysql", "amqp"))


def registry(config: tomqueue.Config) -> list[dict[str, object]]:
    with get_engine(config).connect() as conn:
        rows = conn.execute(select(WorkerRecord.__table__)).all()
    return [r._asdict() for r in rows]


def job_row(config: tomqueue.Config, job_id: int) -> Job | None:
    with get_engine(config).connect() as conn:
        found = conn.execute(select(Job.__table__).where(Job.id == job_id)).first()
    return None if found is None else Job(**found._asdict())


@on_stacks(*STACKS)
def test_registry_row_tracks_the_worker_and_its_running_job(
    stack: Stack, ledger_path: str
) -> None:
    config = stack.config.replace(heartbeat_interval=0.3, lease_timeout=3.0)
    tomqueue.configure(config)
    job = tomqueue.enqueue(Sleepy(ledger_path, "busy", 2.0), queue="mail")
    worker = WorkerThread(config, queues=["mail"], threads=1).start()
    try:
        wait_until(lambda: ledger.counts(ledger_path, "start")["busy"], 20, "the job to start")

        def running() -> dict[str, object] | None:
            rows = registry(config)
            ours = rows and json.loads(str(rows[0]["current_jobs"])) == [job.id]
            return rows[0] if ours else None

        first = wait_until(running, 5, "the heartbeat to report the running job")
        assert isinstance(first, dict)
        assert first["name"] == worker.worker.name
        assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
        assert first["queues"] == "mail"
        assert first["started_at"] <= first["last_seen"]  # type: ignore[operator]
        wait_until(
            lambda: registry(config)[0]["last_seen"] > first["last_seen"],  # type: ignore[operator]
            5,
            "last_seen to advance",
        )
        wait_until(lambda: ledger.counts(ledger_path)["busy"], 10, "the job to finish")
        wait_until(
            lambda: registry(config)[0]["current_jobs"] == "[]", 5, "current_jobs to empty"
        )
    finally:
        worker.stop()
        assert worker.join(20) == 0
    assert registry(config) == [], "a stopped worker leaves the registry"


@on_stacks(*STACKS)
def test_an_outcome_is_not_recorded_over_a_lock_taken_over_meanwhile(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = stack.config
    caplog.set_level(logging.WARNING, logger="tomqueue")
    job = tomqueue.enqueue(Sleepy(ledger_path, "fenced", 1.5))
    worker = WorkerThread(config, threads=1).start()
    try:
        wait_until(lambda: ledger.counts(ledger_path, "start")["fenced"], 20, "the job to start")
        before = job_row(config, job.id)
        assert before is not None and before.locked_by == worker.worker.name
        with get_engine(config).begin() as conn:  # what a takeover by another worker does
            now = db_now(conn)
            conn.execute(
                insert(WorkerRecord).values(
                    name="host:elsewhere pid:1",
                    host="elsewhere",
                    pid=1,
                    queues="balance",
                    started_at=now,
                    last_seen=now,  # alive for lease_timeout (60 s): its lock is held
                    current_jobs=json.dumps([job.id]),
                )
            )
            conn.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(
                    locked_by="host:elsewhere pid:1",
                    locked_at=now,
                    fence=Job.fence + 1,
                )
            )
        wait_until(lambda: ledger.counts(ledger_path)["fenced"], 10, "the job to finish")
        wait_until(lambda: "lock was lost" in caplog.text, 10, "the discarded outcome")
    finally:
        worker.stop()
        assert worker.join(20) == 0
    after = job_row(config, job.id)
    assert after is not None, "the old holder deleted the row of a job it no longer owns"
    assert after.locked_by == "host:elsewhere pid:1" and after.fence == before.fence + 1
    assert after.attempts == 0 and after.failed_at is None
    assert not worker.counters.get("succeeded")


@on_stacks(("sqlite", "polling"), ("postgresql", "polling"), ("mysql", "polling"))
def test_the_sweeper_lease_has_one_holder_at_a_time(stack: Stack) -> None:
    engine = get_engine(stack.config)
    with engine.begin() as conn:
        now = db_now(conn)
        assert try_acquire(conn, "sweeper", "a", 10, now)
        assert not try_acquire(conn, "sweeper", "b", 10, now)
        assert try_acquire(conn, "sweeper", "a", 10, now), "the holder renews"
        assert not try_acquire(conn, "sweeper", "b", 10, now + timedelta(seconds=9))
        assert try_acquire(conn, "sweeper", "b", 10, now + timedelta(seconds=11)), "expired"
        assert not try_acquire(conn, "sweeper", "a", 10, now + timedelta(seconds=12))


def lock_as(config: tomqueue.Config, job_id: int, name: str) -> None:
    with get_engine(config).begin() as conn:
        now = db_now(conn)
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(locked_at=now - timedelta(minutes=5), locked_by=name, fence=Job.fence + 1)
        )


@on_stacks(("sqlite", "polling"), ("postgresql", "polling"), ("mysql", "polling"))
def test_a_new_worker_releases_the_locks_its_dead_namesake_left(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's name is Delayed::Job's ``host:... pid:...``, which a restarted container
    reuses: whatever a dead process of that name had locked is released at registration
    (a fence later), and nobody else's lock is touched."""
    caplog.set_level(logging.WARNING, logger="tomqueue.registry")
    config = stack.config
    mine = [tomqueue.enqueue(Sleepy(ledger_path, f"mine-{i}", 0.0)) for i in range(3)]
    other = tomqueue.enqueue(Sleepy(ledger_path, "other", 0.0))
    for job in mine:
        lock_as(config, job.id, "host:box pid:7")
    lock_as(config, other.id, "host:box pid:70")
    free = tomqueue.enqueue(Sleepy(ledger_path, "free", 0.0))

    Heartbeat(config, get_engine(config), "host:box pid:7", []).register()

    for job in mine:
        row = job_row(config, job.id)
        assert row is not None and row.locked_by is None and row.locked_at is None
        assert row.fence == 2, "released a fence later than the dead process's lock"
    kept = job_row(config, other.id)
    assert kept is not None and kept.locked_by == "host:box pid:70" and kept.fence == 1
    untouched = job_row(config, free.id)
    assert untouched is not None and untouched.locked_by is None and untouched.fence == 0
    assert "released 3 lock(s) left by a dead process named host:box pid:7" in caplog.text
