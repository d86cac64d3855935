"""enqueue_many: one INSERT, ids in order, notifications published together (pipelined
confirms on AMQP), the same rules as enqueue, and the caller's transaction respected."""

from __future__ import annotations

from sqlalchemy.orm import Session

import tomqueue
from tests import ledger
from tests.conftest import AMQP_STACKS, Stack, job_count, on_stacks, queue_depth, run_worker
from tests.jobs import Record
from tomqueue.db import get_engine


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
