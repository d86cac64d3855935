"""A Delayed::Job-style worker: the baseline every workload compares TomQueue with.

Classic Delayed::Job (no ``SKIP LOCKED``): each worker thread polls the table with

    SELECT * FROM delayed_jobs
    WHERE ((run_at <= :now AND (locked_at IS NULL OR locked_at < :now - max_run_time))
           OR locked_by = :me) AND failed_at IS NULL
    ORDER BY priority ASC, run_at ASC LIMIT 1 FOR UPDATE

then ``UPDATE locked_at, locked_by`` and commits (``--reserve select``, the default), runs
the job and ``DELETE``s the row. ``--reserve dj`` uses Delayed::Job's own per-database SQL
instead (PostgreSQL: ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE) RETURNING *``;
MySQL/MariaDB: ``UPDATE ... ORDER BY priority, run_at LIMIT 1`` then a ``SELECT`` of the row it
locked). When nothing is found the thread sleeps ``--sleep`` seconds (Delayed::Job's
``sleep_delay``, 5 s by default). Each thread holds one connection, like ActiveRecord.

    python -m bench.dj_baseline --url URL --threads 4 --exit-on-empty
    python -m bench.dj_baseline --url URL --max-jobs 2000 --max-seconds 20

On exit it prints one JSON line: processed, errors, elapsed seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tomqueue import handler as handlers
from tomqueue.db import utcnow
from tomqueue.schema import jobs

ALLOWED = frozenset({"bench.jobs"})
READY = (
    "((run_at <= :now AND (locked_at IS NULL OR locked_at < :expired)) OR locked_by = :name)"
    " AND failed_at IS NULL"
)
ORDER = "ORDER BY priority ASC, run_at ASC"
SELECT_FOR_UPDATE = f"SELECT * FROM delayed_jobs WHERE {READY} {ORDER} LIMIT 1 FOR UPDATE"
LOCK = "UPDATE delayed_jobs SET locked_at = :now, locked_by = :name WHERE id = :id"
DJ_POSTGRES = (
    "UPDATE delayed_jobs SET locked_at = :now, locked_by = :name WHERE id IN "
    f"(SELECT id FROM delayed_jobs WHERE {READY} {ORDER} LIMIT 1 FOR UPDATE) RETURNING *"
)
DJ_MYSQL = (
    f"UPDATE delayed_jobs SET locked_at = :now, locked_by = :name WHERE {READY} {ORDER} LIMIT 1"
)
DJ_MYSQL_FETCH = (
    "SELECT * FROM delayed_jobs WHERE locked_at = :now AND locked_by = :name "
    "AND failed_at IS NULL LIMIT 1"
)
DELETE = "DELETE FROM delayed_jobs WHERE id = :id"
RETRY = (
    "UPDATE delayed_jobs SET attempts = attempts + 1, run_at = :run_at, last_error = :error, "
    "locked_at = NULL, locked_by = NULL WHERE id = :id"
)


@dataclass(frozen=True)
class Settings:
    url: str
    threads: int = 1
    sleep: float = 5.0
    exit_on_empty: bool = False
    max_jobs: int | None = None
    max_seconds: float | None = None
    max_run_time: float = 4 * 3600.0
    reserve: str = "select"
    ready_file: str | None = None


@dataclass
class Stats:
    processed: int = 0
    failed: int = 0
    errors: int = 0
    polls_empty: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str) -> None:
        with self.lock:
            setattr(self, key, getattr(self, key) + 1)


class Quota:
    """Stops the threads after ``max_jobs`` reservations or ``max_seconds``."""

    def __init__(self, max_jobs: int | None, max_seconds: float | None) -> None:
        self.left = max_jobs
        self.deadline = time.monotonic() + max_seconds if max_seconds else None
        self._lock = threading.Lock()

    def take(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        with self._lock:
            if self.left is None:
                return True
            if self.left <= 0:
                return False
            self.left -= 1
            return True

    def give_back(self) -> None:
        with self._lock:
            if self.left is not None:
                self.left += 1


# --- the database side -----------------------------------------------------------------


def make_baseline_engine(url: str, threads: int) -> Engine:
    """A plain pool, one connection per thread, no pre-ping (ActiveRecord keeps its
    connection); MySQL/MariaDB sessions in UTC and the server's default isolation."""
    parsed = make_url(url)
    engine = create_engine(parsed, pool_size=threads + 1, max_overflow=threads)
    if parsed.get_backend_name() in ("mysql", "mariadb"):

        def utc(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cur:
                cur.execute("SET SESSION time_zone = '+00:00'")

        event.listen(engine, "connect", utc)
    return engine


def params(name: str, max_run_time: float) -> dict[str, Any]:
    now = utcnow()
    return {"now": now, "expired": now - timedelta(seconds=max_run_time), "name": name}


def reserve(conn: Connection, name: str, settings: Settings) -> Any | None:
    """Lock the next job (Delayed::Job's ``reserve``); ``None`` if nothing is ready."""
    values = params(name, settings.max_run_time)
    with conn.begin():
        if settings.reserve == "dj":
            return _reserve_dj(conn, values)
        row = conn.execute(text(SELECT_FOR_UPDATE), values).first()
        if row is not None:
            conn.execute(text(LOCK), {**values, "id": row.id})
        return row


def _reserve_dj(conn: Connection, values: dict[str, Any]) -> Any | None:
    if conn.dialect.name == "postgresql":
        return conn.execute(text(DJ_POSTGRES), values).first()
    if conn.execute(text(DJ_MYSQL), values).rowcount == 0:
        return None
    return conn.execute(text(DJ_MYSQL_FETCH), values).first()


def run(conn: Connection, row: Any, stats: Stats) -> None:
    """Rebuild the payload, ``perform`` it, then delete the row (or schedule a retry)."""
    try:
        handlers.load(row.handler, ALLOWED).perform()
    except Exception as exc:
        later = utcnow() + timedelta(seconds=(row.attempts + 1) ** 4 + 5)
        values = {"id": row.id, "run_at": later, "error": repr(exc)}
        retrying(lambda: _execute(conn, RETRY, values), stats)
        stats.add("failed")
        return
    retrying(lambda: _delete(conn, row.id), stats)
    stats.add("processed")


def _delete(conn: Connection, job_id: int) -> None:
    with conn.begin():
        conn.execute(text(DELETE), {"id": job_id})


def retrying(fn: Callable[[], None], stats: Stats, attempts: int = 20) -> None:
    """Run ``fn`` again after a deadlock (InnoDB's gap locks make them common here)."""
    for attempt in range(attempts):
        try:
            fn()
            return
        except DBAPIError:
            stats.add("errors")
            if attempt == attempts - 1:
                raise
            time.sleep(0.001 * (attempt + 1))


def _execute(conn: Connection, sql: str, values: dict[str, Any]) -> None:
    with conn.begin():
        conn.execute(text(sql), values)


def enqueue(engine: Engine, handler: str, run_at: datetime | None = None) -> None:
    """Delayed::Job's ``enqueue``: one INSERT in its own transaction."""
    now = utcnow()
    row = {
        "priority": 0,
        "attempts": 0,
        "handler": handler,
        "run_at": run_at or now,
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as conn:
        conn.execute(insert(jobs).values(**row))


# --- the worker ------------------------------------------------------------------------


def work(
    engine: Engine, name: str, settings: Settings, quota: Quota, stop: threading.Event, stats: Stats
) -> None:
    with engine.connect() as conn:
        while not stop.is_set() and quota.take():
            try:
                row = reserve(conn, name, settings)
            except DBAPIError:  # deadlock or lock wait timeout: Delayed::Job retries too
                stats.add("errors")
                quota.give_back()
                continue
            if row is not None:
                run(conn, row, stats)
                continue
            quota.give_back()
            stats.add("polls_empty")
            if settings.exit_on_empty:
                return
            stop.wait(settings.sleep)


def worker_names(count: int) -> list[str]:
    base = f"host:{socket.gethostname()} pid:{os.getpid()}"
    return [base if count == 1 else f"{base} thread:{i}" for i in range(count)]


def run_workers(settings: Settings, stop: threading.Event | None = None) -> dict[str, Any]:
    import bench.jobs  # noqa: F401 - the job classes the handlers name

    stop = stop or threading.Event()
    engine = make_baseline_engine(settings.url, settings.threads)
    with engine.connect() as conn:  # fail early and warm the pool
        conn.execute(text("SELECT 1"))
    stats, quota = Stats(), Quota(settings.max_jobs, settings.max_seconds)
    threads = [
        threading.Thread(
            target=work,
            args=(engine, name, settings, quota, stop, stats),
            name=f"dj-{i}",
            daemon=True,
        )
        for i, name in enumerate(worker_names(settings.threads))
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    if settings.ready_file:
        Path(settings.ready_file).touch()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    elapsed = time.monotonic() - started
    engine.dispose()
    return {
        "processed": stats.processed,
        "failed": stats.failed,
        "errors": stats.errors,
        "polls_empty": stats.polls_empty,
        "elapsed": round(elapsed, 4),
    }


def parse(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m bench.dj_baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("TOMQUEUE_DATABASE_URL"), required=False)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sleep", type=float, default=5.0, help="seconds between empty polls")
    p.add_argument("--exit-on-empty", action="store_true")
    p.add_argument("--max-jobs", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--max-run-time", type=float, default=4 * 3600.0)
    p.add_argument("--reserve", choices=("select", "dj"), default="select")
    p.add_argument("--ready-file", default=None, help="touched once the threads run")
    a = p.parse_args(argv)
    if not a.url:
        p.error("--url (or TOMQUEUE_DATABASE_URL) is required")
    if a.threads < 1:
        p.error("--threads must be >= 1")
    return Settings(
        a.url,
        a.threads,
        a.sleep,
        a.exit_on_empty,
        a.max_jobs,
        a.max_seconds,
        a.max_run_time,
        a.reserve,
        a.ready_file,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(json.dumps(run_workers(settings, stop)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
