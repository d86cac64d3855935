"""The worker's two hot statements, as plain SQL for the driver.

Building these with SQLAlchemy's expression language (an ``IN`` of row values, compiled
with its cache key per batch) costs more CPU per job than the database spends running them,
so they are written once per dialect here and sent with ``exec_driver_sql``:

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
from typing import Any

from sqlalchemy import Connection, DateTime

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
    now = str(now_sql(dialect))
    values = f"locked_at = {now}, locked_by = %s, fence = fence + 1, updated_at = {now}"
    ready = "failed_at IS NULL AND locked_at IS NULL"
    if dialect == "postgresql":
        sql = (
            f"UPDATE delayed_jobs SET {values} WHERE id = ANY(%s) AND (id, version) IN "
            "(SELECT * FROM unnest(%s::bigint[], %s::bigint[])) "
            f"AND {ready} AND run_at <= {now} + %s * interval '1 second' RETURNING {COLUMNS}"
        )
        ids = [p[0] for p in pairs]
        params: tuple[Any, ...] = (name, ids, ids, [p[1] for p in pairs], tolerance)
        return _rows(conn.exec_driver_sql(sql, params))
    due = f"run_at <= {now} + INTERVAL %s MICROSECOND" if dialect != "sqlite" else "run_at <= %s"
    table = "delayed_jobs" if dialect == "sqlite" else f"delayed_jobs {BY_PRIMARY_KEY}"
    sql = f"UPDATE {table} SET {values} WHERE {_match(pairs, 'version')} AND {ready} AND {due}"
    limit: Any = round(tolerance * 1_000_000)
    if dialect == "sqlite":
        limit = _sqlite_now_plus(conn, tolerance)
    params = (name, *_flat(pairs), limit)
    if dialect == "sqlite":
        return _rows(conn.exec_driver_sql(_qmark(f"{sql} RETURNING {COLUMNS}"), params))
    conn.exec_driver_sql(sql, params)
    ids = [p[0] for p in pairs]
    marks = ", ".join(["%s"] * len(ids))
    mine = f"SELECT {COLUMNS} FROM delayed_jobs WHERE id IN ({marks}) AND locked_by = %s"
    return _rows(conn.exec_driver_sql(mine, (*ids, name)))


def delete_done(conn: Connection, pairs: Pairs) -> set[int]:
    """Delete the jobs whose fence still matches; returns the ids deleted."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        sql = (
            "DELETE FROM delayed_jobs WHERE id = ANY(%s) AND (id, fence) IN "
            "(SELECT * FROM unnest(%s::bigint[], %s::bigint[])) RETURNING id"
        )
        ids = [p[0] for p in pairs]
        return {row[0] for row in conn.exec_driver_sql(sql, (ids, ids, [p[1] for p in pairs]))}
    sql = f"DELETE FROM delayed_jobs WHERE {_match(pairs, 'fence')}"
    if conn.dialect.delete_returning:
        sql = f"{sql} RETURNING id"
        if dialect == "sqlite":
            sql = _qmark(sql)
        return {row[0] for row in conn.exec_driver_sql(sql, tuple(_flat(pairs)))}
    one = "DELETE FROM delayed_jobs WHERE id = %s AND fence = %s"
    return {
        job_id for job_id, fence in pairs if conn.exec_driver_sql(one, (job_id, fence)).rowcount
    }


def _match(pairs: Pairs, column: str) -> str:
    """``id IN (...) AND (id, <column>) IN (...)`` with %s placeholders, ids first: the
    plain ``id IN`` lets MySQL use the primary key (a row-value ``IN`` alone is a scan)."""
    ids = ", ".join(["%s"] * len(pairs))
    rows = ", ".join(["(%s, %s)"] * len(pairs))
    return f"id IN ({ids}) AND (id, {column}) IN ({rows})"


def _flat(pairs: Pairs) -> list[int]:
    return [p[0] for p in pairs] + [value for pair in pairs for value in pair]


def _qmark(sql: str) -> str:
    return sql.replace("%s", "?")


def _sqlite_now_plus(conn: Connection, seconds: float) -> str:
    now = conn.exec_driver_sql(
        f"SELECT strftime('%Y-%m-%d %H:%M:%f', 'now', '{seconds:+.3f} seconds') || '000'"
    )
    return str(now.scalar_one())


def _rows(result: Any) -> list[dict[str, Any]]:
    """The rows as dicts (``zip`` with the keys: a fourth of ``dict(row._mapping)``'s cost);
    SQLite's timestamps, which come back as text, as datetimes."""
    keys = list(result.keys())
    out = [dict(zip(keys, row, strict=True)) for row in result]
    if result.dialect.name == "sqlite":
        for values in out:
            for key in _TIMES:
                if isinstance(values.get(key), str):
                    values[key] = datetime.fromisoformat(values[key])
    return out
