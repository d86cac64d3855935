"""``insert_one``: enqueue's INSERT below the driver's cursor (issue 5) writes what the
cursor would write, and fails as the cursor would.

PostgreSQL: values of every type enqueue stores round-trip; other types go through the
cursor; a statement deallocated behind our back is prepared again; a connection whose
``prepare_threshold`` is None is sent the statement unprepared; a server error is the
driver's exception with its SQLSTATE and leaves the connection usable. MySQL: the statement
text is exactly PyMySQL's ``mogrify``.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import PoolProxiedConnection

from tests.conftest import Stack, job_count, on_stacks
from tomqueue import insert_one as module
from tomqueue import persist
from tomqueue.connections import connection_stack, kept_cursor
from tomqueue.db import get_autocommit_engine, get_engine
from tomqueue.schema import jobs

WHEN = datetime(2026, 12, 7, 5, 40, 1, 234567)
ROUND = datetime(1999, 1, 2, 3, 4, 5)  # no microseconds: written without a fraction


def row(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "priority": -7,
        "attempts": 0,
        "handler": '{"kind":"tests.jobs:Record","attrs":{"text":"Résumé ✉ \'q\' \\\\ %s"}}',
        "last_error": None,
        "run_at": WHEN,
        "locked_at": None,
        "locked_by": None,
        "failed_at": None,
        "queue": "mail",
        "created_at": ROUND,
        "updated_at": WHEN,
        "version": 2**40,
        "fence": 0,
        "notified_at": WHEN,
        "crashes": 0,
    }
    values.update(changes)
    return values


@pytest.fixture
def kept(stack: Stack) -> Iterator[tuple[Engine, PoolProxiedConnection]]:
    engine = get_autocommit_engine(stack.config)
    raw = connection_stack(engine).take()
    yield engine, raw
    connection_stack(engine).give_back(raw)


def stored(stack: Stack, job_id: int) -> dict[str, Any]:
    with get_engine(stack.config).connect() as conn:
        found = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one()
    return {k: v for k, v in found.items() if k != "id"}


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_every_value_enqueue_stores_round_trips(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    engine, raw = kept
    for values in (row(), row(queue=None, notified_at=None, priority=2**31 - 1)):
        job_id = module.insert_one(engine, raw, values)
        assert stored(stack, job_id) == values


@on_stacks(("postgresql", "polling"))
def test_postgresql_other_types_go_through_the_cursor(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    """An aware datetime (a hook may set one) is converted by psycopg, to UTC."""
    engine, raw = kept
    aware = WHEN.replace(tzinfo=UTC)
    assert module._pg_params(row(run_at=aware)) is None
    job_id = module.insert_one(engine, raw, row(run_at=aware))
    assert stored(stack, job_id)["run_at"] == WHEN


@on_stacks(("postgresql", "polling"))
def test_postgresql_another_client_encoding_goes_through_the_cursor(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    engine, raw = kept
    kept_cursor(raw).execute("SET client_encoding TO 'LATIN1'")
    raw.info.pop(module._UTF8_KEY, None)
    try:
        latin = row(handler='{"kind":"tests.jobs:Record","attrs":{"text":"café"}}')
        job_id = module.insert_one(engine, raw, latin)
        assert stored(stack, job_id) == latin
        assert raw.info[module._UTF8_KEY] is False
    finally:
        kept_cursor(raw).execute("SET client_encoding TO 'UTF8'")
        raw.info.pop(module._UTF8_KEY, None)


@on_stacks(("postgresql", "polling"))
def test_postgresql_a_nul_in_a_text_is_refused_not_cut(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    """libpq reads a text parameter up to its first NUL: such a value takes the cursor's
    way, which refuses it."""
    engine, _raw = kept
    assert module._pg_params(row(handler="{}\x00tail")) is None
    with pytest.raises(DBAPIError):
        persist._insert_autocommit(engine, row(handler="{}\x00tail"))


@on_stacks(("postgresql", "polling"))
def test_postgresql_a_deallocated_statement_is_prepared_again(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    engine, raw = kept
    first = module.insert_one(engine, raw, row())
    kept_cursor(raw).execute("DEALLOCATE ALL")
    second = module.insert_one(engine, raw, row())
    assert second > first and stored(stack, second) == row()


@on_stacks(("postgresql", "polling"))
def test_postgresql_a_statement_prepared_already_is_used(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    engine, raw = kept
    module.insert_one(engine, raw, row())
    raw.info.pop(module._PREPARED_KEY)  # forgotten on our side only
    job_id = module.insert_one(engine, raw, row())
    assert stored(stack, job_id) == row()


@on_stacks(("postgresql", "polling"))
def test_postgresql_without_prepared_statements_sends_it_unprepared(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    engine, raw = kept
    kept_cursor(raw).execute("DEALLOCATE ALL")
    raw.info.pop(module._PREPARED_KEY, None)
    raw.driver_connection.prepare_threshold = None  # type: ignore[union-attr]
    job_id = module.insert_one(engine, raw, row())
    assert stored(stack, job_id) == row()
    cursor = kept_cursor(raw)
    cursor.execute("SELECT count(*) FROM pg_prepared_statements")
    assert cursor.fetchone()[0] == 0


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_server_error_is_the_drivers_and_the_connection_stays_usable(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    engine, _raw = kept
    with pytest.raises(IntegrityError) as raised:
        persist._insert_autocommit(engine, row(handler=None))
    if engine.dialect.name == "postgresql":
        assert raised.value.orig.sqlstate == "23502"  # type: ignore[union-attr]
        assert "handler" in str(raised.value)
    assert not raised.value.connection_invalidated
    job_id = persist._insert_autocommit(engine, row())
    assert stored(stack, job_id) == row()


@on_stacks(("mysql", "polling"))
def test_mysql_statement_is_pymysqls_own(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    engine, raw = kept
    sql = module.statement(engine)
    cursor = kept_cursor(raw)
    for values in (
        row(),
        row(queue=None, run_at=ROUND, priority=True, locked_by="a\\b'c\"d\n\x00\x1a"),
        row(run_at=WHEN.replace(tzinfo=UTC), attempts=2**62, last_error="ü" * 3),
    ):
        assert module._mysql_statement(raw.driver_connection, sql, values) == cursor.mogrify(
            sql, values
        )


class Interrupted(Exception):
    pass


@on_stacks(("postgresql", "polling"))
def test_postgresql_a_signal_handler_that_raises_while_waiting_invalidates_the_connection(
    stack: Stack, kept: tuple[Engine, PoolProxiedConnection]
) -> None:
    """The INSERT waits behind another transaction's table lock; a signal handler raises
    meanwhile (as a SIGTERM handler may): the exception reaches the caller, the statement
    is cancelled and the connection is never used again."""
    engine, raw = kept
    module.insert_one(engine, raw, row())  # prepared, poller made
    before = job_count(stack.config)

    def interrupt(_signum: int, _frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    with get_engine(stack.config).connect() as blocker:
        blocker.exec_driver_sql("LOCK TABLE delayed_jobs IN ACCESS EXCLUSIVE MODE")
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            with pytest.raises(Interrupted):
                module.insert_one(engine, raw, row())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            blocker.rollback()
    assert not raw.is_valid
    assert job_count(stack.config) == before  # cancelled, not written behind our back
