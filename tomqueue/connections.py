"""Connections kept between statements, below the pool's checkout and check-in.

- ``HeldConnection``: one long-lived thread's own connection (a worker's lockers and
  recorder).
- ``ConnectionStack``: autocommit connections kept checked out for single statements
  (``enqueue``'s INSERT).
- ``kept_cursor``: the driver cursor kept with a pooled connection; ``driver_execute`` runs
  a hot statement on it and ``driver_error`` turns a driver error into SQLAlchemy's,
  invalidating what a lost connection leaves dead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection

from tomqueue.config import Config
from tomqueue.db import get_autocommit_engine, get_engine, psycopg_lost


class HeldConnection:
    """A connection that one long-lived thread keeps for its statements: no pool checkout
    and no reset round trip per use. On PostgreSQL and MySQL it comes from the autocommit
    engine (``get_autocommit_engine``: autocommit is set when the connection is made, not at
    each checkout), so a statement is one round trip, committed when it returns; on SQLite
    each ``use()`` is one transaction. After an error it is dropped and the next use
    connects afresh: back to the pool after a database error (SQLAlchemy has invalidated it
    if it was lost), closed for good after any other exception, which may have interrupted
    a statement halfway (an interruption, a signal handler)."""

    def __init__(self, config: Config) -> None:
        engine = get_engine(config)
        self.autocommit = engine.dialect.name != "sqlite"
        self.engine = get_autocommit_engine(config) if self.autocommit else engine
        self._conn: Connection | None = None

    @contextmanager
    def use(self) -> Iterator[Connection]:
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            conn = self._conn = self.engine.connect()
        try:
            if self.autocommit:
                yield conn
            else:
                with conn.begin():
                    yield conn
        except BaseException as exc:
            self.close(invalidate=not isinstance(exc, DBAPIError))
            raise

    def close(self, invalidate: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                if invalidate:
                    conn.invalidate()
                conn.close()


class ConnectionStack:
    """Pooled connections kept checked out between single statements (``enqueue``'s
    INSERT): taking one is a list pop instead of a pool checkout and check-in, which cost
    ~20 µs of CPU and ~40 µs of a round trip's time on our 2-core machines. Last in, first
    out, at most ``KEEP`` idle. A connection goes back to the pool when it failed, after
    ``KEEP_FOR`` seconds, or once the engine's pool was replaced (``driver_error`` disposes
    of it after a lost connection): the pool's recycling and invalidation still apply."""

    KEEP = 4
    KEEP_FOR = 60.0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._idle: list[PoolProxiedConnection] = []

    def take(self) -> PoolProxiedConnection:
        while self._idle:
            try:
                raw = self._idle.pop()  # atomic: another thread may have taken the last
            except IndexError:
                break
            if self._fresh(raw):
                return raw
            self._release(raw)
        raw = self.engine.raw_connection()
        raw.info[_KEPT_KEY] = (self.engine.pool, time.monotonic())
        return raw

    def give_back(self, raw: PoolProxiedConnection, failed: bool = False) -> None:
        if not failed and self._fresh(raw) and len(self._idle) < self.KEEP:
            self._idle.append(raw)
        else:
            self._release(raw)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for raw in idle:
            with suppress(Exception):
                raw.close()

    def _release(self, raw: PoolProxiedConnection) -> None:
        """Back to its pool; closed outright if that pool was replaced (a disposed pool
        keeps what is checked in until it is garbage-collected)."""
        pool, _since = raw.info.get(_KEPT_KEY, (None, 0.0))
        if raw.is_valid and pool is not self.engine.pool:
            raw.detach()
        raw.close()

    def _fresh(self, raw: PoolProxiedConnection) -> bool:
        pool, since = raw.info.get(_KEPT_KEY, (None, 0.0))
        return (
            raw.is_valid and pool is self.engine.pool and time.monotonic() - since < self.KEEP_FOR
        )


_stacks: dict[Engine, ConnectionStack] = {}
_KEPT_KEY = "tomqueue_kept"


def connection_stack(engine: Engine) -> ConnectionStack:
    """The engine's ``ConnectionStack`` (created once; closed by ``dispose_engines``)."""
    stack = _stacks.get(engine)
    if stack is None:  # setdefault is atomic: two threads get the same stack
        stack = _stacks.setdefault(engine, ConnectionStack(engine))
    return stack


def close_stack(engine: Engine) -> None:
    """Close the engine's kept connections (``dispose_engines``)."""
    stack = _stacks.pop(engine, None)
    if stack is not None:
        stack.close()


_CURSOR_KEY = "tomqueue_cursor"


def kept_cursor(raw: PoolProxiedConnection) -> Any:
    """The driver cursor kept with a pooled DBAPI connection (its ``info`` lives as long as
    that connection and is cleared when it is replaced): one cursor per connection, used
    by one thread at a time like the connection itself."""
    cursor = raw.info.get(_CURSOR_KEY)
    if cursor is None:
        cursor = raw.info[_CURSOR_KEY] = raw.cursor()
    return cursor


def driver_execute(conn: Connection, sql: str, params: Sequence[Any]) -> Any:
    """Run one statement (the driver's own SQL and parameter style) on the connection's
    kept driver cursor and return that cursor. For the hot statements: SQLAlchemy's
    execution context costs ~0.3 ms a statement on a host whose CPU was idle, more than a
    lock statement's own work. Errors are raised as SQLAlchemy's, as any statement's are."""
    raw = conn.connection
    cursor = kept_cursor(raw)
    try:
        cursor.execute(sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise driver_error(conn.engine, raw, exc, sql, params, cursor) from exc
    return cursor


def driver_error(
    engine: Engine,
    raw: PoolProxiedConnection | None,
    exc: Any,
    sql: str | None,
    params: Any,
    cursor: Any = None,
) -> BaseException:
    """SQLAlchemy's exception for a driver error; a lost connection is invalidated, and so
    is the rest of the pool (after a database restart every pooled connection is dead)."""
    dialect = engine.dialect
    lost = raw is not None and (
        dialect.is_disconnect(exc, raw.dbapi_connection, cursor)
        or (dialect.driver == "psycopg" and psycopg_lost(exc))
    )
    if lost:
        assert raw is not None
        raw.invalidate(exc)
        engine.dispose()
    wrapped: BaseException = DBAPIError.instance(
        sql, params, exc, dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=dialect
    )
    return wrapped
