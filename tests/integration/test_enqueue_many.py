"""enqueue_many: one INSERT, ids in order, notifications published together (pipelined
confirms on AMQP), the same rules as enqueue, and the caller's transaction respected."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

import tomqueue
from tests import ledger
from tests.conftest import AMQP_STACKS, Stack, job_count, on_stacks, queue_depth, run_worker
from tests.jobs import Record
from tomqueue.db import get_engine
from tomqueue.schema import Job


def test_enqueue_many_persists_in_order_and_every_job_runs_once(
    stack: Stack, ledger_path: str
) -> None:
    jobs = tomqueue.enqueue_many(Record(ledger_path, f"j{i}") for i in range(60))
    assert [j.id for j in jobs] == sorted(j.id for j in jobs)
    assert len({j.id for j in jobs}) == 60
    assert job_count(stack.config) == 60

    run_worker(stack.config, threads=4)

    assert ledger.counts(ledger_path) == {f"j{i}": 1 for i in range(60)}
    assert job_count(stack.config) == 0


@on_stacks(*AMQP_STACKS)
def test_enqueue_many_publishes_once_per_job_after_commit_only(
    stack: Stack, ledger_path: str
) -> None:
    config = stack.config
    name = f"{config.prefix}.balance.normal"
    with Session(get_engine(config)) as session, session.begin():
        tomqueue.enqueue_many([Record(ledger_path, "kept")] * 5, session=session)
    assert tomqueue.flush(30)
    assert queue_depth(config, name)[0] == 5
    with Session(get_engine(config)) as session:
        session.begin()
        tomqueue.enqueue_many([Record(ledger_path, "gone")] * 5, session=session)
        session.rollback()
    assert tomqueue.flush(30)
    assert queue_depth(config, name)[0] == 5
    assert job_count(config) == 5


def test_enqueue_many_keeps_priority_and_queue_rules(stack: Stack, ledger_path: str) -> None:
    jobs = tomqueue.enqueue_many(
        [Record(ledger_path, "a"), Record(ledger_path, "b")], priority=0, queue="mail"
    )
    assert [(j.priority, j.queue) for j in jobs] == [(0, "mail"), (0, "mail")]


def test_enqueue_many_stores_every_column_as_given(stack: Stack, ledger_path: str) -> None:
    """The bulk statements (PostgreSQL: per-column arrays; MariaDB: one JSON document)
    store what a row-by-row INSERT would: text with 4-byte UTF-8, quotes, backslashes and
    escapes, per-job priorities and queues, microsecond timestamps, NULLs."""
    run_at = datetime(2031, 5, 6, 7, 8, 9, 123456)
    payloads = [
        Record(ledger_path, "plain"),
        Record(ledger_path, 'émoji 🎉 "quoted" \\ back\nslash \x01 \u2028'),
        Record(ledger_path, "x" * 70_000),
    ]
    jobs = tomqueue.enqueue_many(payloads, run_at=run_at)
    jobs += tomqueue.enqueue_many([Record(ledger_path, "p")] * 2, priority=-5, queue="mail")
    with get_engine(stack.config).connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Job.__table__))}
    assert len(rows) == 5
    for job in jobs:
        row = rows[job.id]
        for column in Job.__table__.columns:
            assert getattr(row, column.name) == getattr(job, column.name), column.name
    assert [rows[j.id].run_at for j in jobs[:3]] == [run_at] * 3
    assert [(rows[j.id].priority, rows[j.id].queue) for j in jobs[3:]] == [(-5, "mail")] * 2
    assert all(rows[j.id].locked_at is None and rows[j.id].last_error is None for j in jobs)


def test_enqueue_many_gives_its_batch_one_moment(stack: Stack, ledger_path: str) -> None:
    """Without ``run_at`` every job of a batch is due at the batch's moment (its
    ``created_at``); a relative ``run_at`` counts from that moment too. Identical jobs make
    every column the same in every row: the bulk statements then carry no per-row data."""
    jobs = tomqueue.enqueue_many([Record(ledger_path, "same")] * 50)
    later = tomqueue.enqueue_many([Record(ledger_path, "later")] * 3, run_at=60)
    assert {(j.run_at, j.created_at) for j in jobs} == {(jobs[0].created_at,) * 2}
    assert {j.run_at - j.created_at for j in later} == {timedelta(seconds=60)}
    with get_engine(stack.config).connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Job.__table__))}
    assert len(rows) == 53
    for job in jobs + later:
        row = rows[job.id]
        for column in Job.__table__.columns:
            assert getattr(row, column.name) == getattr(job, column.name), column.name
