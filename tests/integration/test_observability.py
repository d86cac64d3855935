"""What an operator's tooling relies on, in-process:

- log records carry stable ``extra`` keys (job id, class, queue, action, duration);
- ``exception_reporter`` receives the errors the worker catches and a publish that failed
  after commit;
- pika heartbeats flow while a job runs longer than several heartbeat intervals (the broker
  would close a connection that misses two).
"""

from __future__ import annotations

import logging

import pytest

import tomqueue
from tests import ledger
from tests.conftest import (
    AMQP_URL,
    Stack,
    job_count,
    on_stacks,
    run_worker,
)
from tests.jobs import Boom, Record, Sleepy
from tomqueue import failpoints
from tomqueue.worker import db_lock


def records(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


@on_stacks(("sqlite", "polling"), ("postgresql", "amqp"))
def test_log_records_carry_stable_keys(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tomqueue")
    ok = tomqueue.enqueue(Record(ledger_path, "ok"), queue="mail")
    bad = tomqueue.enqueue(Boom(ledger_path, "bad"))

    run_worker(stack.config, queues=["balance", "mail"], threads=1)

    [enqueued] = [r for r in records(caplog, "enqueue") if r.job_id == ok.id]  # type: ignore[attr-defined]
    assert enqueued.queue == "mail"  # type: ignore[attr-defined]
    [succeeded] = records(caplog, "succeeded")
    assert succeeded.job_id == ok.id  # type: ignore[attr-defined]
    assert succeeded.job_class == "tests.jobs:Record"  # type: ignore[attr-defined]
    assert succeeded.queue == "mail"  # type: ignore[attr-defined]
    assert succeeded.duration >= 0  # type: ignore[attr-defined]
    [retried] = records(caplog, "retry")
    assert retried.job_id == bad.id and retried.queue == "balance"  # type: ignore[attr-defined]
    assert retried.job_class == "tests.jobs:Boom"  # type: ignore[attr-defined]
    [error] = records(caplog, "error")
    assert error.job_id == bad.id  # type: ignore[attr-defined]


@on_stacks(("sqlite", "polling"), ("postgresql", "amqp"))
def test_exception_reporter_gets_internal_errors_and_the_job_still_runs(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[BaseException] = []
    config = stack.config.replace(exception_reporter=reported.append)
    tomqueue.configure(config)
    original = db_lock.lock_batch
    calls = []

    def flaky_lock(works: list[object]) -> set[object]:
        calls.append(works)
        if len(calls) == 1:
            raise RuntimeError("database hiccup (injected)")
        return original(works)  # type: ignore[arg-type,return-value]

    monkeypatch.setattr(db_lock, "lock_batch", flaky_lock)
    tomqueue.enqueue(Record(ledger_path, "survivor"))

    # --exit-on-complete: the requeued delivery is waited for, not left for the next worker
    worker = run_worker(config, threads=1, timeout=20)

    assert [str(e) for e in reported] == ["database hiccup (injected)"]
    assert worker.counters.get("internal_error") == 1
    assert ledger.markers(ledger_path) == ["survivor"]
    assert job_count(config) == 0


@on_stacks(("postgresql", "amqp"))
def test_exception_reporter_gets_a_publish_that_failed_after_commit(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[BaseException] = []
    config = stack.config.replace(exception_reporter=reported.append)
    monkeypatch.setitem(failpoints._ACTIONS, "enqueue.before_publish", "raise")

    job = tomqueue.enqueue(Record(ledger_path, "unpublished"), config=config)

    assert job.id and job_count(config) == 1  # committed; the sweeper will publish it
    assert [str(e) for e in reported] == ["failpoint enqueue.before_publish"]


@on_stacks(("postgresql", "amqp"))
def test_broker_heartbeats_flow_while_a_job_runs(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1 s heartbeat and a 6 s job: a worker whose connection thread blocked on the job
    would miss several heartbeats, the broker would close the connection and the worker
    would log a reconnection."""
    caplog.set_level(logging.INFO, logger="tomqueue")
    config = stack.config.replace(amqp_url=f"{AMQP_URL}?heartbeat=1")
    tomqueue.configure(config)
    tomqueue.enqueue(Sleepy(ledger_path, "long", 6.0))

    worker = run_worker(config, threads=1, timeout=30)

    assert ledger.counts(ledger_path) == {"long": 1}
    assert worker.counters.get("succeeded") == 1
    assert "broker connection lost" not in caplog.text
    assert not records(caplog, "reconnect")
