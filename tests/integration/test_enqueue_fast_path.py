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
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import PoolProxiedConnection

import tomqueue
from tests.conftest import (
    AMQP_STACKS,
    Stack,
    amqp_channel,
    drain_queue,
    job_count,
    on_stacks,
    run_threads,
    wait_until,
)
from tests.jobs import Record
from tests.ports import free_port
from tomqueue import persist
from tomqueue.config import Config
from tomqueue.connections import ConnectionStack, connection_stack
from tomqueue.db import dispose_engines, get_autocommit_engine, get_engine
from tomqueue.errors import PublishError
from tomqueue.message import decode
from tomqueue.transport import background


def kept_connections(config: Config) -> list[PoolProxiedConnection]:
    return list(connection_stack(get_autocommit_engine(config))._idle)


def server_session(config: Config, raw: PoolProxiedConnection) -> int:
    postgres = get_engine(config).dialect.name == "postgresql"
    cursor = raw.cursor()
    cursor.execute("SELECT pg_backend_pid()" if postgres else "SELECT CONNECTION_ID()")
    return int(cursor.fetchone()[0])


def kill_session(config: Config, session: int) -> None:
    with get_engine(config).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
        else:
            conn.exec_driver_sql(f"KILL {int(session)}")


def session_alive(config: Config, session: int) -> bool:
    with get_engine(config).connect() as conn:
        if conn.dialect.name == "postgresql":
            sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = :s"
        else:
            sql = "SELECT count(*) FROM information_schema.processlist WHERE id = :s"
        return bool(conn.execute(text(sql), {"s": session}).scalar_one())


def pool_checkouts(config: Config) -> list[int]:
    """A list that grows by one at each checkout from the enqueue engine's pool."""
    seen: list[int] = []
    event.listen(get_autocommit_engine(config), "checkout", lambda *_: seen.append(1))
    return seen


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

    def work(t: int) -> None:
        mine = [tomqueue.enqueue(Record(ledger_path, f"{t}-{i}")).id for i in range(200)]
        with lock:
            ids.extend(mine)

    errors = run_threads(8, work, 120)
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
    (kept,) = kept_connections(config)  # the enqueue connection, kept out of the pool
    kill_session(config, server_session(config, kept))
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


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_enqueue_keeps_one_connection_out_of_the_pool(stack: Stack, ledger_path: str) -> None:
    """One-by-one enqueues take their connection from the stack, not from the pool: one
    checkout for twenty INSERTs, and the same server session throughout."""
    config = stack.config
    tomqueue.enqueue(Record(ledger_path, "warm"))
    (kept,) = kept_connections(config)
    session = server_session(config, kept)
    checkouts = pool_checkouts(config)
    for i in range(20):
        tomqueue.enqueue(Record(ledger_path, f"j{i}"))
    assert checkouts == []
    assert [server_session(config, raw) for raw in kept_connections(config)] == [session]
    assert job_count(config) == 21


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_kept_connection_goes_back_to_the_pool_after_keep_for(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older than ``KEEP_FOR``: returned to the pool (where recycling and invalidation
    apply) and checked out again."""
    config = stack.config
    tomqueue.enqueue(Record(ledger_path, "warm"))
    monkeypatch.setattr(ConnectionStack, "KEEP_FOR", 0.0)
    checkouts = pool_checkouts(config)
    for i in range(3):
        tomqueue.enqueue(Record(ledger_path, f"j{i}"))
    assert len(checkouts) == 3
    assert kept_connections(config) == []


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_replaced_pool_is_not_bypassed(stack: Stack, ledger_path: str) -> None:
    """After the engine's pool is replaced (``driver_error`` disposes of it when another
    statement lost its connection), the kept connection is closed, not used: the next
    enqueue checks out a fresh one from the new pool."""
    config = stack.config
    tomqueue.enqueue(Record(ledger_path, "warm"))
    (kept,) = kept_connections(config)
    old_session = server_session(config, kept)
    get_autocommit_engine(config).dispose()
    checkouts = pool_checkouts(config)
    tomqueue.enqueue(Record(ledger_path, "after"))
    assert len(checkouts) == 1
    (fresh,) = kept_connections(config)
    assert server_session(config, fresh) != old_session
    assert not session_alive(config, old_session)
    assert job_count(config) == 2


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_dispose_engines_closes_the_kept_connections(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    tomqueue.enqueue(Record(ledger_path, "warm"))
    (kept,) = kept_connections(config)
    session = server_session(config, kept)
    dispose_engines()
    assert not session_alive(config, session)


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_concurrent_enqueues_keep_at_most_keep_connections(stack: Stack, ledger_path: str) -> None:
    """Sixteen threads enqueue at once: every row is written, at most ``KEEP`` connections
    stay out of the pool afterwards, each a different server session."""
    config = stack.config

    def work(t: int) -> None:
        for i in range(25):
            tomqueue.enqueue(Record(ledger_path, f"{t}-{i}"))

    assert run_threads(16, work, 60) == []
    assert job_count(config) == 16 * 25
    kept = kept_connections(config)
    assert 1 <= len(kept) <= ConnectionStack.KEEP
    assert len({server_session(config, raw) for raw in kept}) == len(kept)


class Interrupted(BaseException):
    """What a signal handler may raise while the INSERT waits for its reply."""


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_connection_interrupted_during_the_insert_is_closed_for_good(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither kept nor given back to the pool: its statement may be halfway."""
    config = stack.config
    tomqueue.enqueue(Record(ledger_path, "warm"))
    (kept,) = kept_connections(config)
    session = server_session(config, kept)

    def interrupted(*_args: object) -> int:
        raise Interrupted

    monkeypatch.setattr(persist, "insert_one", interrupted)
    with pytest.raises(Interrupted):
        tomqueue.enqueue(Record(ledger_path, "lost"))
    monkeypatch.undo()

    assert kept_connections(config) == []
    wait_until(lambda: not session_alive(config, session), 10, "the session to end")
    tomqueue.enqueue(Record(ledger_path, "after"))
    assert job_count(config) == 2
