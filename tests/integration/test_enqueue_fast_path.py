"""enqueue's fast path (issue 5): one autocommit INSERT, then a hand-off to this process's
background publisher, which publishes with confirms. ``tomqueue.flush()`` waits for them.

Commit and rollback inside a caller's Session / Connection are in ``test_transactions.py``
(they go through the same hand-off); broker faults are in ``tests/e2e/test_enqueue_publisher.py``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

import tomqueue
from tests.conftest import AMQP_STACKS, Stack, amqp_channel, drain_queue, job_count, on_stacks
from tests.jobs import Record
from tests.ports import free_port
from tomqueue import persist
from tomqueue.db import get_autocommit_engine, get_engine
from tomqueue.errors import PublishError
from tomqueue.message import decode
from tomqueue.transport import background


def normal_queue_ids(stack: Stack) -> list[int]:
    config = stack.config
    return [decode(b, h).job_id for b, h in drain_queue(config, f"{config.prefix}.balance.normal")]


@on_stacks(*AMQP_STACKS)
def test_concurrent_threads_each_notification_arrives_exactly_once(
    stack: Stack, ledger_path: str
) -> None:
    """8 threads x 200 enqueues: every committed job's notification arrives once."""
    ids: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait(10)
            mine = [tomqueue.enqueue(Record(ledger_path, f"{t}-{i}")).id for i in range(200)]
            with lock:
                ids.extend(mine)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert tomqueue.flush(60) is True
    assert len(set(ids)) == 1600 and job_count(stack.config) == 1600
    seen = Counter(normal_queue_ids(stack))
    assert set(seen) == set(ids)
    assert set(seen.values()) == {1}, "a notification arrived more than once"


def test_the_row_is_committed_when_enqueue_returns(stack: Stack, ledger_path: str) -> None:
    job = tomqueue.enqueue(Record(ledger_path, "now"))
    with get_engine(stack.config).connect() as conn:  # another connection sees it at once
        found = conn.execute(text("SELECT id FROM delayed_jobs")).scalars().all()
    assert found == [job.id]


@on_stacks(("postgresql", "amqp"))
def test_sync_publish_waits_for_the_confirm_inside_enqueue(stack: Stack, ledger_path: str) -> None:
    config = stack.config.replace(sync_publish=True)
    tomqueue.enqueue(Record(ledger_path, "sync"), config=config)
    with amqp_channel(config) as channel:  # no flush: the message is already there
        ok = channel.queue_declare(f"{config.prefix}.balance.normal", passive=True)  # type: ignore[attr-defined]
    assert ok.method.message_count == 1
    assert (os.getpid(), config.amqp_url, config.prefix) not in background._publishers


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_dead_pooled_connection_is_retried_once(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enqueue connection's server session is killed (as by a database restart): the
    next enqueue fails once on it, invalidates the pool and succeeds on a fresh one."""
    config = stack.config
    tomqueue.enqueue(Record(ledger_path, "first"))
    postgres = stack.database == "postgresql"
    with get_autocommit_engine(config).connect() as conn:  # the pooled enqueue connection
        session = conn.exec_driver_sql(
            "SELECT pg_backend_pid()" if postgres else "SELECT CONNECTION_ID()"
        ).scalar_one()
    with get_engine(config).begin() as conn:
        if postgres:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
        else:
            conn.exec_driver_sql(f"KILL {int(session)}")
    time.sleep(0.2)
    attempts: list[BaseException | None] = []
    original = persist._insert_autocommit

    def counted(*args: Any) -> int:
        try:
            job_id = original(*args)
        except BaseException as exc:
            attempts.append(exc)
            raise
        attempts.append(None)
        return job_id

    monkeypatch.setattr(persist, "_insert_autocommit", counted)
    second = tomqueue.enqueue(Record(ledger_path, "second"))
    assert second.id is not None
    assert job_count(config) == 2
    assert len(attempts) == 2 and isinstance(attempts[0], DBAPIError)
    assert attempts[0].connection_invalidated and attempts[1] is None


@on_stacks(("postgresql", "amqp"))
def test_a_forked_child_publishes_its_own_notifications(stack: Stack, ledger_path: str) -> None:
    """A child forked while the parent's publisher thread runs gets a publisher (and
    database engines) of its own; nothing is lost or published twice on either side."""
    before = [tomqueue.enqueue(Record(ledger_path, f"p{i}")).id for i in range(5)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids, exit without running the parent's atexit
        code = 1
        try:
            ids = [tomqueue.enqueue(Record(ledger_path, f"c{i}")).id for i in range(5)]
            os.write(write, ",".join(map(str, ids)).encode())
            code = 0 if tomqueue.flush(30) else 2
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = [int(i) for i in os.read(read, 1000).decode().split(",") if i]
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    after = [tomqueue.enqueue(Record(ledger_path, f"q{i}")).id for i in range(5)]
    assert tomqueue.flush(30) is True
    seen = Counter(normal_queue_ids(stack))
    assert seen == Counter(before + child + after)


@on_stacks(("sqlite", "polling"))
def test_a_notification_given_up_is_logged_reported_and_flush_says_so(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Broker unreachable: enqueue still commits and returns at once; after
    ``publish_retry_for`` the notification is given up with an ERROR naming the job, the
    ``exception_reporter`` gets a PublishError, and ``flush`` answers False."""
    reported: list[BaseException] = []
    config = stack.config.replace(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F",
        publish_retry_for=0.3,
        exception_reporter=reported.append,
    )
    started = time.monotonic()
    job = tomqueue.enqueue(Record(ledger_path, "lost"), config=config)
    assert time.monotonic() - started < 1.0
    assert job_count(config) == 1
    assert tomqueue.flush(10) is False
    failed = [r for r in caplog.records if getattr(r, "action", None) == "publish_failed"]
    assert [(r.levelno, getattr(r, "job_id", None)) for r in failed] == [(logging.ERROR, job.id)]
    assert "not confirmed" in failed[0].getMessage()
    assert [type(e) for e in reported] == [PublishError] and str(job.id) in str(reported[0])


@on_stacks(("postgresql", "amqp"))
def test_an_unroutable_notification_is_sent_again_after_declaring_again(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue is deleted behind the publisher's back: the broker returns the next
    notification (``mandatory``); the publisher logs it, declares again and re-sends it."""
    config = stack.config
    tomqueue.enqueue(Record(ledger_path, "before"))
    assert tomqueue.flush(30) is True
    with amqp_channel(config) as channel:
        channel.queue_delete(f"{config.prefix}.balance.normal")  # type: ignore[attr-defined]
    job = tomqueue.enqueue(Record(ledger_path, "after"))
    assert tomqueue.flush(30) is True
    assert normal_queue_ids(stack) == [job.id]
    retried = [r for r in caplog.records if getattr(r, "action", None) == "publish_retry"]
    assert [getattr(r, "job_id", None) for r in retried] == [job.id]
    assert "unroutable" in retried[0].getMessage()


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_an_unreachable_database_raises_sqlalchemys_error(stack: Stack, ledger_path: str) -> None:
    """Nothing was committed, so enqueue raises — the same ``OperationalError`` as before
    the fast path."""
    port = free_port()
    url = make_url(stack.config.database_url).set(host="127.0.0.1", port=port)
    config = stack.config.replace(database_url=url.render_as_string(hide_password=False))
    with pytest.raises(OperationalError):
        tomqueue.enqueue(Record(ledger_path, "nowhere"), config=config)
