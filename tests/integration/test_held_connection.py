"""A worker thread's held connection after the database killed the sessions of its pool:
the failure is one the outcome writes retry, and the next use connects afresh."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError

from tests.conftest import Stack, on_stacks
from tests.e2e.faults import dbctl
from tomqueue.connections import HeldConnection
from tomqueue.db import get_autocommit_engine
from tomqueue.worker import outcome


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_killed_pooled_connection_fails_as_a_transient_error(stack: Stack) -> None:
    config = stack.config
    pooled = get_autocommit_engine(config).connect()
    pooled.exec_driver_sql("SELECT 1")
    pooled.close()  # idle in the pool, where the next use will find it
    assert dbctl.kill_sessions(config) >= 1

    held = HeldConnection(config)
    try:
        with held.use() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # what record_batch retries: a connection error, wrapped
        assert isinstance(exc, DBAPIError) and outcome._transient(exc), repr(exc)
    else:
        pytest.fail("the killed connection was used without an error")
    with held.use() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    held.close()


@on_stacks(("postgresql", "polling"))
def test_a_pooled_connection_left_mid_command_is_dropped_with_the_pool(stack: Stack) -> None:
    """A connection given back to the pool in the middle of a command (a thread interrupted
    while it waited: psycopg then refuses the next statement, "another command is already in
    progress", without calling the connection broken) counts as lost: it and the pool's
    other connections are replaced, so the next use works instead of failing forever."""
    engine = get_autocommit_engine(stack.config)
    engine.dispose()  # a pool of exactly one connection: the poisoned one
    raw = engine.raw_connection()
    raw.driver_connection.pgconn.send_query(b"SELECT pg_sleep(0.2)")
    raw.close()  # back to the pool, its query still running

    held = HeldConnection(stack.config)
    with pytest.raises(DBAPIError) as failed, held.use() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert failed.value.connection_invalidated, failed.value
    assert outcome._transient(failed.value)
    with held.use() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    held.close()


class Interrupted(BaseException):
    """What the watchdog or a signal handler raises inside a thread."""


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_connection_interrupted_halfway_never_goes_back_to_the_pool(stack: Stack) -> None:
    get_autocommit_engine(stack.config).dispose()  # the pool holds nothing else
    held = HeldConnection(stack.config)
    with pytest.raises(Interrupted), held.use() as conn:
        used = conn.connection.dbapi_connection
        raise Interrupted  # as if raised between sending a statement and reading its reply
    engine = get_autocommit_engine(stack.config)
    with engine.connect() as other:
        assert other.connection.dbapi_connection is not used
    assert used is not None and _closed(used)
    held.close()


def _closed(dbapi_connection: object) -> bool:
    closed = getattr(dbapi_connection, "closed", None)  # psycopg: a property
    if closed is None:  # PyMySQL: open
        return not getattr(dbapi_connection, "open", True)
    return bool(closed)
