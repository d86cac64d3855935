"""Rows in bulk, not through enqueue: COPY on PostgreSQL, multi-row INSERTs on MariaDB.

Backlog shapes (``W2``):
- ``ready``: due now, ``run_at`` ascending with ``id`` (so Delayed::Job's
  ``ORDER BY priority, run_at`` takes the lowest ids first);
- ``future``: ``run_at`` a year ahead;
- ``failed``: kept failed jobs (``failed_at`` set, 25 attempts), ``run_at`` in the past;
- ``due``: jobs that just became due (the 2,000 measured on top of a future/failed backlog).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from bench.env import Target
from tomqueue.db import utcnow

COLUMNS = (
    "priority",
    "attempts",
    "handler",
    "last_error",
    "run_at",
    "locked_at",
    "locked_by",
    "failed_at",
    "queue",
    "created_at",
    "updated_at",
    "version",
    "fence",
    "notified_at",
    "crashes",
)
CHUNK = 5_000
Row = tuple[Any, ...]


def start_of(shape: str, now: datetime) -> datetime:
    """The ``run_at`` of a shape's first row."""
    return {
        "ready": now - timedelta(hours=2),
        "future": now + timedelta(days=365),
        "failed": now - timedelta(days=30),
        "due": now - timedelta(seconds=60),  # just became due: after any ready backlog
    }[shape]


def rows(shape: str, count: int, handler: str, now: datetime | None = None) -> Iterator[Row]:
    """``count`` rows of ``shape`` (or ``due``); ``run_at`` grows by 1 ms per row."""
    now = now or utcnow()
    start = start_of(shape, now)
    failed = shape == "failed"
    for i in range(count):
        run_at = start + timedelta(milliseconds=i)
        yield (
            0,
            25 if failed else 0,
            handler,
            "RuntimeError: benchmark failure" if failed else None,
            run_at,
            None,
            None,
            run_at + timedelta(minutes=1) if failed else None,
            None,
            now,
            now,
            1,
            0,
            now,  # notified: the sweeper leaves these alone for sweep_quiet seconds
            0,
        )


def load(target: Target, data: Iterator[Row]) -> int:
    """Insert the rows in bulk; returns how many."""
    if target.dialect == "postgresql":
        return _copy(target, data)
    return _multirow_insert(target, data)


def _copy(target: Target, data: Iterator[Row]) -> int:
    n = 0
    raw = target.engine.raw_connection()
    try:
        cursor = raw.cursor()
        with cursor.copy(f"COPY delayed_jobs ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in data:
                copy.write_row(row)
                n += 1
        raw.commit()
    finally:
        raw.close()
    return n


def _multirow_insert(target: Target, data: Iterator[Row]) -> int:
    """PyMySQL rewrites ``executemany`` of one INSERT into multi-row INSERT statements."""
    sql = (
        f"INSERT INTO delayed_jobs ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    )
    n = 0
    raw = target.engine.raw_connection()
    try:
        cursor = raw.cursor()
        while chunk := list(islice(data, CHUNK)):
            cursor.executemany(sql, chunk)
            n += len(chunk)
        raw.commit()
    finally:
        raw.close()
    return n
