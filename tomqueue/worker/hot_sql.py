"""The worker's two hot statements, as plain SQL for the driver.

Building these with SQLAlchemy's expression language (an ``IN`` of row values, compiled
with its cache key per batch) costs more CPU per job than the database spends running them,
so they are written once per dialect here and sent straight to the driver's cursor
(``tomqueue.connections.driver_execute``; SQLite through ``exec_driver_sql``):

- ``lock_plain``: lock the jobs of a batch that are due, unlocked, unfailed and at the
  message's version — one ``UPDATE ... RETURNING`` (MySQL: ``UPDATE`` then read back);
- ``delete_done``: delete finished jobs whose fence still matches — one ``DELETE ...
  RETURNING id`` (MySQL without ``RETURNING``: one statement per job).

Both run on a connection in autocommit mode (PostgreSQL, MySQL) or in a transaction
(SQLite). Times come from the database clock (``tomqueue.db.now_sql``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, DateTime

from tomqueue.connections import driver_execute
from tomqueue.db import now_sql
from tomqueue.schema import jobs

COLUMNS = ", ".join(c.name for c in jobs.columns)
_TIMES = {c.name for c in jobs.columns if isinstance(c.type, DateTime)}

Pairs = Sequence[tuple[int, int]]  # (job id, version or fence)

# MySQL/MariaDB: left to itself, the optimizer may walk ``ix_delayed_jobs_due`` for the
# lock's ``failed_at IS NULL AND run_at <= ...`` (it does on a small table), locking the
# index entries of every due job, ours or not: a recorder's DELETE of finished jobs then
# deadlocks with it. By the primary key, only the rows named are locked.
BY_PRIMARY_KEY = "FORCE INDEX (PRIMARY)"


def reads_back(dialect: str) -> bool:
    """Whether ``lock_plain`` reads its locks back by worker name (no ``UPDATE ...
    RETURNING``): then one worker's lockers must not lock concurrently."""
    return dialect not in ("postgresql", "sqlite")


def lock_plain(conn: Connection, name: str, pairs: Pairs, tolerance: float) -> list[dict[str, Any]]:
    """Lock what can run at once; returns the locked rows as they are now."""
    dialect = conn.dialect.name
    limit = _sqlite_now_plus(conn, tolerance) if dialect == "sqlite" else tolerance
    sql, params = lock_statement(dialect, name, pairs, limit)
    if not reads_back(dialect):
        return _rows(conn, f"{sql} RETURNING {COLUMNS}", params)
    driver_execute(conn, sql, params)
    ids = [p[0] for p in pairs]
    mine = f"SELECT {COLUMNS} FROM delayed_jobs WHERE {_in(ids)} AND locked_by = %s"
    return _rows(conn, mine, (*ids, name))


def lock_statement(
    dialect: str, name: str, pairs: Pairs, tolerance: float | str
) -> tuple[str, tuple[Any, ...]]:
    """The lock's ``UPDATE`` (without ``RETURNING``) and its parameters. ``tolerance``:
    seconds, or on SQLite the latest ``run_at`` itself.

    Only the primary key may find the rows. PostgreSQL has no index hints, so there the
    row's state is one opaque predicate (``(...) IS TRUE``): as plain conditions, the
    planner may take ``failed_at IS NULL`` to ``ix_delayed_jobs_due`` — it does when the
    statistics say unfailed rows are rare (many failed jobs kept, then a backlog) or the
    table is tiny (a drained queue) — and walk every unfailed index entry, dead ones
    included, for each lock: 0.3 ms behind 3,000 ready jobs and 1.3-13 ms on a drained
    table with its dead rows, where the primary key takes 0.1 ms. MySQL: ``FORCE INDEX``."""
    now = _now(dialect)
    values = f"locked_at = {now}, locked_by = %s, fence = fence + 1, updated_at = {now}"
    ready = "failed_at IS NULL AND locked_at IS NULL"
    match, params = _match(pairs, "version", dialect)
    if dialect == "postgresql":
        due = f"run_at <= {now} + %s * interval '1 second'"
        where = f"{match} AND ({ready} AND {due}) IS TRUE"
        return f"UPDATE delayed_jobs SET {values} WHERE {where}", (name, *params, tolerance)
    if dialect == "sqlite":
        sql = f"UPDATE delayed_jobs SET {values} WHERE {match} AND {ready} AND run_at <= %s"
        return sql, (name, *params, tolerance)
    assert isinstance(tolerance, float | int)
    due = f"run_at <= {now} + INTERVAL %s MICROSECOND"
    sql = f"UPDATE delayed_jobs {BY_PRIMARY_KEY} SET {values} WHERE {match} AND {ready} AND {due}"
    return sql, (name, *params, round(tolerance * 1_000_000))


def delete_done(conn: Connection, pairs: Pairs) -> set[int]:
    """Delete the jobs whose fence still matches; returns the ids deleted."""
    if conn.dialect.delete_returning:  # PostgreSQL, SQLite, MariaDB
        match, params = _match(pairs, "fence", conn.dialect.name)
        sql = f"DELETE FROM delayed_jobs WHERE {match} RETURNING id"
        return {row["id"] for row in _rows(conn, sql, params)}
    one = "DELETE FROM delayed_jobs WHERE id = %s AND fence = %s"
    return {
        job_id for job_id, fence in pairs if driver_execute(conn, one, (job_id, fence)).rowcount
    }


@cache
def _now(dialect: str) -> str:
    """``now_sql`` as text (compiled once per dialect, not once per lock)."""
    return str(now_sql(dialect))


def _match(pairs: Pairs, column: str, dialect: str) -> tuple[str, tuple[Any, ...]]:
    """The rows named by (id, ``column``) pairs, with %s placeholders, and the parameters.
    One pair (an idle worker's batch): plain equalities — on PostgreSQL ~0.35 ms sooner
    than the array join. PostgreSQL: arrays, one statement text whatever the batch's size.
    Others: ``id IN (...) AND (id, <column>) IN (...)``, ids first: the plain ``id IN``
    lets MySQL use the primary key (a row-value ``IN`` alone is a scan)."""
    if len(pairs) == 1:
        return f"id = %s AND {column} = %s", pairs[0]
    ids = [p[0] for p in pairs]
    if dialect == "postgresql":
        arrays = f"(id, {column}) IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))"
        return f"id = ANY(%s) AND {arrays}", (ids, ids, [p[1] for p in pairs])
    rows = ", ".join(["(%s, %s)"] * len(pairs))
    flat = [value for pair in pairs for value in pair]
    return f"{_in(ids)} AND (id, {column}) IN ({rows})", (*ids, *flat)


def _in(ids: Sequence[int]) -> str:
    return "id = %s" if len(ids) == 1 else f"id IN ({', '.join(['%s'] * len(ids))})"


def _sqlite_now_plus(conn: Connection, seconds: float) -> str:
    now = conn.exec_driver_sql(
        f"SELECT strftime('%Y-%m-%d %H:%M:%f', 'now', '{seconds:+.3f} seconds') || '000'"
    )
    return str(now.scalar_one())


def _rows(conn: Connection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    """The statement's rows as dicts (``zip`` with the keys: a fourth of
    ``dict(row._mapping)``'s cost). SQLite (``?`` placeholders, in SQLAlchemy's
    transaction) goes through SQLAlchemy, and its timestamps, which come back as text,
    become datetimes."""
    if conn.dialect.name != "sqlite":
        cursor = driver_execute(conn, sql, params)
        keys = [d[0] for d in cursor.description]
        return [dict(zip(keys, row, strict=True)) for row in cursor.fetchall()]
    result = conn.exec_driver_sql(sql.replace("%s", "?"), tuple(params))
    keys = list(result.keys())
    out = [dict(zip(keys, row, strict=True)) for row in result]
    for values in out:
        for key in _TIMES:
            if isinstance(values.get(key), str):
                values[key] = datetime.fromisoformat(values[key])
    return out
