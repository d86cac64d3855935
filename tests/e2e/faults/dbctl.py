"""Database control for fault tests: kill the sessions of the test's own database (never
another one), hold a row lock. Restarts and crashes of a whole server go to a private one
(``dbservers.py``), never to the shared servers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psutil
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import Engine, make_url

from tomqueue.config import Config


def database_name(config: Config) -> str:
    name = make_url(config.database_url).database
    assert name, config.database_url
    return name


def admin_engine(config: Config) -> Engine:
    """A small engine of the test's own, outside the pools of the code under test."""
    return create_engine(config.database_url, pool_size=1, max_overflow=0, pool_pre_ping=True)


def client_ports(pids: Iterable[int], server_port: int) -> set[int]:
    """Local ports of the TCP connections these processes (and their children) hold to
    ``server_port``: how a database session is traced back to an OS process."""
    ports: set[int] = set()
    for pid in pids:
        try:
            process = psutil.Process(pid)
            family = [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            try:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == server_port:
                        ports.add(conn.laddr.port)
            except psutil.Error:
                continue
    return ports


def kill_sessions(
    config: Config, statement_like: str | None = None, pids: Iterable[int] | None = None
) -> int:
    """Kill sessions on the test database, never our own: all of them, or only those
    running a statement ``LIKE statement_like``, or only those of the OS processes ``pids``
    (matched by client port). Returns how many were killed."""
    name = database_name(config)
    url = make_url(config.database_url)
    engine = admin_engine(config)
    try:
        with engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            ports = None
            if pids is not None:
                ports = client_ports(pids, url.port or (5432 if postgres else 3306))
                if not ports:
                    return 0
            if postgres:
                query = (
                    "SELECT pid, client_port FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                )
                if statement_like:
                    query += " AND state = 'active' AND query LIKE :like"
            else:
                query = (
                    "SELECT id, host FROM information_schema.processlist "
                    "WHERE db = :db AND id <> CONNECTION_ID()"
                )
                if statement_like:
                    query += " AND info LIKE :like"
            sessions = conn.execute(text(query), {"db": name, "like": statement_like}).all()
            killed = 0
            for session, client in sessions:
                port = client if postgres else _port_of(client)
                if ports is not None and port not in ports:
                    continue
                try:
                    if postgres:
                        ok = conn.execute(
                            text("SELECT pg_terminate_backend(:pid)"), {"pid": session}
                        ).scalar_one()
                    else:
                        conn.execute(text(f"KILL {int(session)}"))
                        ok = True
                except Exception:  # gone meanwhile
                    ok = False
                killed += int(bool(ok))
            return killed
    finally:
        engine.dispose()


def _port_of(host: str | None) -> int | None:
    """``127.0.0.1:54321`` (MariaDB's processlist host) -> 54321."""
    if not host or ":" not in host:
        return None
    try:
        return int(host.rsplit(":", 1)[1])
    except ValueError:
        return None


def waiting_on_lock(conn: Connection, config: Config, statement_like: str) -> int:
    """Sessions of the test database blocked on a lock while running a matching statement."""
    name = database_name(config)
    if conn.dialect.name == "postgresql":
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = :db "
            "AND wait_event_type = 'Lock' AND query LIKE :like"
        )
    else:
        query = (
            "SELECT count(*) FROM information_schema.innodb_trx t "
            "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
            "WHERE t.trx_state = 'LOCK WAIT' AND p.db = :db AND t.trx_query LIKE :like"
        )
    count = int(conn.execute(text(query), {"db": name, "like": statement_like}).scalar_one())
    conn.commit()  # PostgreSQL's activity view is a snapshot per transaction
    return count


@contextmanager
def row_lock(config: Config, table: str, row_id: int) -> Iterator[Connection]:
    """Hold ``SELECT ... FOR UPDATE`` on one row (the test's own session) until the block
    ends; ``waiting_on_lock`` on the yielded connection sees who queues behind it."""
    engine = admin_engine(config)
    lock_engine = create_engine(config.database_url, pool_size=1, max_overflow=0)
    try:
        with lock_engine.connect() as holder, engine.connect() as observer:
            holder.begin()
            found = holder.execute(
                text(f"SELECT id FROM {table} WHERE id = :id FOR UPDATE"), {"id": row_id}
            ).first()
            assert found is not None, f"{table} row {row_id} is gone"
            yield observer
            holder.rollback()
    finally:
        lock_engine.dispose()
        engine.dispose()
