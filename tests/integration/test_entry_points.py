"""Must-show 8: Delayed::Job's entry points.

``tomqueue.delay(obj).method(...)``, ``tomqueue.delay(func)(...)``, ``@handle_asynchronously``,
``work_off(n)`` → ``(successes, failures)``, ``delay_jobs=False`` (inline, exceptions propagate
after the hooks), explicit ``priority=0`` over a non-zero ``default_priority``, queue
precedence (argument > ``payload.queue_name`` > default) and named queues routed to
``<prefix>.<queue>.<level>`` and worked by ``--queue`` workers.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import tomqueue
from tests import jobs, ledger
from tests.conftest import (
    AMQP_STACKS,
    Stack,
    all_queue_names,
    declare_topology,
    drain_queue,
    job_count,
    on_stacks,
    queue_depth,
    run_worker,
)
from tests.jobs import Account, Boom, Hooked, Mailer, Record, Spawner, Urgent
from tomqueue import Delayed, failpoints
from tomqueue.db import get_engine
from tomqueue.message import decode


def stored(config: tomqueue.Config, job_id: int) -> Delayed.Job:
    with Session(get_engine(config)) as session:
        job = session.get(Delayed.Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_delayed_calls_are_worked_by_a_worker(stack: Stack, ledger_path: str) -> None:
    account = Account("alice")
    j1 = tomqueue.delay(account).deposit(ledger_path, "deposit", amount=5)
    j2 = tomqueue.delay(jobs.add_to_ledger)(ledger_path, "func", suffix="!")
    j3 = jobs.async_record(ledger_path, "async-func")
    j4 = Account("bob").withdraw(ledger_path, "async-method", amount=3)
    for job in (j1, j2, j3, j4):
        assert isinstance(job, Delayed.Job) and job.id is not None
        assert job.name == "tomqueue.delay:PerformableMethod"
    assert ledger.markers(ledger_path) == [], "something ran at enqueue time"
    assert job_count(stack.config) == 4

    run_worker(stack.config, threads=1)

    assert sorted(ledger.markers(ledger_path)) == sorted(
        ["deposit:alice:5", "func!", "async-func", "async-method:bob:-3"]
    )
    assert job_count(stack.config) == 0


def test_handle_asynchronously_options_and_now(
    sqlite_config: tomqueue.Config, ledger_path: str
) -> None:
    job = jobs.async_record_urgent(ledger_path, "urgent")
    assert (job.priority, job.queue) == (-5, "mail")
    stored_job = stored(sqlite_config, job.id)
    assert (stored_job.priority, stored_job.queue) == (-5, "mail")
    jobs.async_record.now(ledger_path, "right-now")  # type: ignore[attr-defined]
    assert ledger.markers(ledger_path) == ["right-now"]


def test_delay_options_are_enqueue_options(
    sqlite_config: tomqueue.Config, ledger_path: str
) -> None:
    job = tomqueue.delay(Account("carol"), priority=7, queue="mail").deposit(ledger_path, "x")
    assert (stored(sqlite_config, job.id).priority, stored(sqlite_config, job.id).queue) == (
        7,
        "mail",
    )


def test_work_off_returns_successes_and_failures(
    sqlite_config: tomqueue.Config, ledger_path: str
) -> None:
    for i in range(3):
        tomqueue.enqueue(Record(ledger_path, f"ok{i}"), priority=0)
    tomqueue.enqueue(Boom(ledger_path, "bad"), priority=5)

    assert tomqueue.work_off(2) == (2, 0)
    assert job_count(sqlite_config) == 2
    assert Delayed.work_off() == (1, 1)
    assert job_count(sqlite_config) == 1  # the failed one waits for its retry
    assert tomqueue.work_off() == (0, 0)
    assert ledger.markers(ledger_path) == ["ok0", "ok1", "ok2", "bad"]


def test_delay_jobs_false_runs_inline_with_hooks(
    sqlite_config: tomqueue.Config, ledger_path: str
) -> None:
    tomqueue.configure(sqlite_config.replace(delay_jobs=False))

    job = Delayed.enqueue(Hooked(ledger_path, "inline"))

    assert [e.event for e in ledger.read(ledger_path)] == [
        "enqueue",
        "before",
        "perform",
        "success",
        "after",
    ]
    assert job is not None
    assert job_count(sqlite_config) == 0


def test_delay_jobs_false_propagates_exceptions_after_hooks(
    sqlite_config: tomqueue.Config, ledger_path: str
) -> None:
    tomqueue.configure(sqlite_config.replace(delay_jobs=False))

    with pytest.raises(ValueError, match="failed on purpose"):
        tomqueue.enqueue(Hooked(ledger_path, "inline-bad", fail=True))

    assert [e.event for e in ledger.read(ledger_path)] == [
        "enqueue",
        "before",
        "perform",
        "error",
        "after",
    ]
    assert job_count(sqlite_config) == 0


def test_delay_jobs_false_runs_delayed_calls_inline(
    sqlite_config: tomqueue.Config, ledger_path: str
) -> None:
    tomqueue.configure(sqlite_config.replace(delay_jobs=False))
    tomqueue.delay(Account("dave")).deposit(ledger_path, "now", amount=1)
    jobs.async_record(ledger_path, "async-now")
    assert ledger.markers(ledger_path) == ["now:dave:1", "async-now"]
    assert job_count(sqlite_config) == 0


def test_explicit_priority_zero_wins_over_default_priority(
    sqlite_config: tomqueue.Config, ledger_path: str
) -> None:
    config = tomqueue.configure(sqlite_config.replace(default_priority=5))
    explicit = tomqueue.enqueue(Record(ledger_path, "zero"), priority=0)
    default = tomqueue.enqueue(Record(ledger_path, "default"))
    own = tomqueue.enqueue(Urgent(ledger_path, "own", priority=-3))
    argument = tomqueue.enqueue(Urgent(ledger_path, "arg", priority=-3), priority=2)
    assert stored(config, explicit.id).priority == 0
    assert stored(config, default.id).priority == 5
    assert stored(config, own.id).priority == -3
    assert stored(config, argument.id).priority == 2


def test_queue_precedence(sqlite_config: tomqueue.Config, ledger_path: str) -> None:
    from_payload = tomqueue.enqueue(Mailer(ledger_path, "m"))
    from_argument = tomqueue.enqueue(Mailer(ledger_path, "m"), queue="billing")
    default = tomqueue.enqueue(Record(ledger_path, "r"))
    named_default = tomqueue.enqueue(Record(ledger_path, "r"), queue="balance")
    record_in_queue = tomqueue.enqueue(Record(ledger_path, "r"), queue="reports")
    assert stored(sqlite_config, from_payload.id).queue == "mail"
    assert stored(sqlite_config, from_argument.id).queue == "billing"
    assert stored(sqlite_config, default.id).queue is None
    assert stored(sqlite_config, named_default.id).queue is None
    assert stored(sqlite_config, record_in_queue.id).queue == "reports"
    with Session(get_engine(sqlite_config)) as session:  # Delayed.Job is queryable
        mail = session.scalars(select(Delayed.Job).where(Delayed.Job.queue == "mail")).all()
    assert [j.id for j in mail] == [from_payload.id]


@on_stacks(*AMQP_STACKS)
def test_named_queue_is_routed_to_its_own_queue_set(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    declare_topology(config, (None, "mail"))
    urgent = tomqueue.enqueue(Mailer(ledger_path, "mail-high"), priority=-1)
    normal = tomqueue.enqueue(Mailer(ledger_path, "mail-normal"))

    high_msgs = drain_queue(config, f"{config.prefix}.mail.high")
    normal_msgs = drain_queue(config, f"{config.prefix}.mail.normal")
    assert [decode(b, h).job_id for b, h in high_msgs] == [urgent.id]
    assert [decode(b, h).job_id for b, h in normal_msgs] == [normal.id]
    assert decode(*high_msgs[0]).queue == "mail"
    for name in all_queue_names(config):  # nothing in the default queue set
        assert queue_depth(config, name)[0] == 0, name


def test_named_queue_jobs_are_worked_by_queue_workers_only(
    stack: Stack, ledger_path: str, request: pytest.FixtureRequest
) -> None:
    config = stack.config
    tomqueue.enqueue(Mailer(ledger_path, "mail"))
    tomqueue.enqueue(Record(ledger_path, "default"))

    run_worker(config, threads=1)  # default queue only
    assert ledger.markers(ledger_path) == ["default"]
    assert job_count(config) == 1

    run_worker(config, threads=1, queues=["mail"])
    assert ledger.markers(ledger_path) == ["default", "mail"]
    assert job_count(config) == 0


def test_min_and_max_priority_limit_what_a_worker_runs(
    stack: Stack, ledger_path: str, request: pytest.FixtureRequest
) -> None:
    """``tomqueue worker --min-priority P --max-priority P`` (Delayed::Job's flags)."""
    config = stack.config
    for priority in (-5, 0, 5, 10):
        tomqueue.enqueue(Record(ledger_path, f"p{priority}"), priority=priority)

    run_worker(config, threads=1, min_priority=0, max_priority=5)

    assert sorted(ledger.markers(ledger_path)) == ["p0", "p5"]
    assert job_count(config) == 2


@on_stacks(*AMQP_STACKS)
def test_exit_on_complete_waits_for_jobs_enqueued_by_jobs(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job enqueues three more; their notifications leave this process's background
    publisher late (a failpoint holds it 1 s): the worker must not call the queues empty
    before they are published."""
    tomqueue.enqueue(Spawner(ledger_path, "parent", 3))
    tomqueue.flush()
    monkeypatch.setitem(failpoints._ACTIONS, "publisher.before_send", "sleep:1.0")

    run_worker(stack.config, threads=2, timeout=30)

    assert sorted(ledger.markers(ledger_path)) == ["parent", "parent.0", "parent.1", "parent.2"]
