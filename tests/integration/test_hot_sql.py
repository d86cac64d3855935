"""The worker's hot statements (``tomqueue.worker.hot_sql``), run on the driver's cursor:
a batch of one (its own statement shape) and a batch of several lock and delete exactly
the rows whose version / fence match, on every database; a driver error comes out as
SQLAlchemy's, transient when the connection was lost."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError

import tomqueue
from tests.conftest import DATABASES, Stack, on_stacks
from tests.e2e.faults import dbctl
from tests.jobs import Record
from tomqueue.config import Config
from tomqueue.connections import HeldConnection
from tomqueue.db import get_engine
from tomqueue.worker import hot_sql, outcome

POLLING = [(d, "polling") for d in DATABASES]
# the workers' own tolerance (run_at_tolerance): with 0, SQLite's clock, which has
# milliseconds, may not yet have reached a job enqueued in the same millisecond
TOLERANCE = Config().run_at_tolerance


@on_stacks(*POLLING)
@pytest.mark.parametrize("size", [1, 3])
def test_lock_and_delete_take_only_the_rows_that_match(
    stack: Stack, ledger_path: str, size: int
) -> None:
    jobs = [tomqueue.enqueue(Record(ledger_path, str(i))) for i in range(size)]
    held = HeldConnection(stack.config)
    try:
        wrong = [(job.id, job.version + 1) for job in jobs]
        with held.use() as conn:
            assert hot_sql.lock_plain(conn, "hot-test", wrong, TOLERANCE) == []
        with held.use() as conn:
            rows = hot_sql.lock_plain(
                conn, "hot-test", [(j.id, j.version) for j in jobs], TOLERANCE
            )
        assert sorted(row["id"] for row in rows) == sorted(job.id for job in jobs)
        assert {(row["locked_by"], row["fence"]) for row in rows} == {("hot-test", 1)}
        assert all(row["locked_at"] is not None and row["handler"] for row in rows)
        with held.use() as conn:  # locked now: not taken again
            assert (
                hot_sql.lock_plain(conn, "other", [(j.id, j.version) for j in jobs], TOLERANCE)
                == []
            )
        with held.use() as conn:
            assert hot_sql.delete_done(conn, [(job.id, 0) for job in jobs]) == set()
        with held.use() as conn:
            assert hot_sql.delete_done(conn, [(job.id, 1) for job in jobs]) == {j.id for j in jobs}
    finally:
        held.close()


@on_stacks(("postgresql", "polling"), ("mysql", "polling"))
def test_a_lost_connection_fails_the_lock_as_a_transient_error(
    stack: Stack, ledger_path: str
) -> None:
    job = tomqueue.enqueue(Record(ledger_path, "lost"))
    held = HeldConnection(stack.config)
    try:
        with held.use() as conn:
            assert hot_sql.delete_done(conn, [(job.id, 99)]) == set()  # connected, in use
        assert dbctl.kill_sessions(stack.config) >= 1
        with pytest.raises(DBAPIError) as raised, held.use() as conn:
            hot_sql.lock_plain(conn, "hot-test", [(job.id, job.version)], TOLERANCE)
        assert outcome._transient(raised.value), repr(raised.value)
        with held.use() as conn:  # the next use connects afresh
            assert [
                r["id"] for r in hot_sql.lock_plain(conn, "hot-test", [(job.id, 1)], TOLERANCE)
            ] == [job.id]
    finally:
        held.close()


@on_stacks(("postgresql", "polling"))
@pytest.mark.parametrize("size", [1, 3])
def test_the_lock_finds_its_rows_by_primary_key_whatever_the_statistics(
    stack: Stack, size: int
) -> None:
    """A new table whose statistics were taken while its rows were failed ones (kept for
    inspection), then a backlog of ready jobs: as plain conditions, ``failed_at IS NULL``
    looks selective and the planner walks ``ix_delayed_jobs_due`` through the whole
    backlog for every lock. The lock's plan must use the primary key, not that index.
    (In a schema of its own, so that the shared table's statistics stay as they are.)"""
    row = (
        "(priority, attempts, handler, run_at, created_at, updated_at, version, fence, "
        "crashes, failed_at) SELECT 0, 0, 'x', now(), now(), now(), 1, 0, 0, {failed} "
        "FROM generate_series(1, {n})"
    )
    raw = get_engine(stack.config).raw_connection()
    try:
        raw.driver_connection.autocommit = True
        cursor = raw.driver_connection.cursor()
        cursor.execute("DROP SCHEMA IF EXISTS tq_plan_test CASCADE")
        cursor.execute("CREATE SCHEMA tq_plan_test")
        cursor.execute("SET search_path TO tq_plan_test")
        cursor.execute(
            "CREATE TABLE delayed_jobs (LIKE public.delayed_jobs INCLUDING ALL) "
            "WITH (autovacuum_enabled = false)"
        )
        cursor.execute(f"INSERT INTO delayed_jobs {row.format(failed='now()', n=5000)}")
        cursor.execute("ANALYZE delayed_jobs")
        cursor.execute(f"INSERT INTO delayed_jobs {row.format(failed='NULL', n=3000)}")
        cursor.execute(f"SELECT id FROM delayed_jobs WHERE failed_at IS NULL LIMIT {size}")
        pairs = [(job_id, 1) for (job_id,) in cursor.fetchall()]
        sql, params = hot_sql.lock_statement("postgresql", "plan-test", pairs, 0.05)
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(line for (line,) in cursor.fetchall())
        assert "failed_at_run_at" not in plan and "ix_delayed_jobs_due" not in plan, plan
        assert "pkey" in plan, plan
    finally:
        raw.driver_connection.cursor().execute("DROP SCHEMA IF EXISTS tq_plan_test CASCADE")
        raw.invalidate()  # its search_path was changed
