"""Engines, the database clock and the schema migration.

All lock-time comparisons use the database clock: ``now_sql`` is the expression, ``db_now``
reads it.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, literal_column, select
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.sql.elements import ColumnElement

from tomqueue.config import Config
from tomqueue.runtime import current_pid

log = logging.getLogger("tomqueue.db")

# per process: a forked child gets engines of its own and never touches (nor closes, nor
# lets the garbage collector finalize) the connections its parent's pools hold
_engines: dict[tuple[int, str, bool], Engine] = {}
_engines_lock = threading.Lock()


def utcnow() -> datetime:
    """Naive UTC now from this process's clock (used only where no database is at hand)."""
    return datetime.now(UTC).replace(tzinfo=None)


def get_engine(config: Config) -> Engine:
    """The process-wide engine for ``config.database_url`` (created once)."""
    return _engine(config.database_url, autocommit=False)


def get_autocommit_engine(config: Config) -> Engine:
    """A second process-wide engine for the same database whose connections are always in
    autocommit mode, for single statements that need no transaction (``enqueue`` outside a
    caller's transaction: one round trip instead of BEGIN, INSERT, COMMIT). Its pool does
    not roll back on check-in: an autocommit connection has nothing to roll back."""
    return _engine(config.database_url, autocommit=True)


def _engine(url: str, autocommit: bool) -> Engine:
    key = (current_pid(), url, autocommit)
    engine = _engines.get(key)  # no lock on the hot path: a dict read is atomic
    if engine is not None:
        return engine
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(url, autocommit)
        return engine


def _unlock_in_child() -> None:  # another thread may have held the lock at the fork
    global _engines_lock
    _engines_lock = threading.Lock()


os.register_at_fork(after_in_child=_unlock_in_child)


def dispose_engines() -> None:
    """Close this process's engines (a parent's, inherited by a fork, are left alone)."""
    from tomqueue.connections import close_stack  # it builds on this module

    pid = current_pid()
    with _engines_lock:
        for key in [key for key in _engines if key[0] == pid]:
            engine = _engines.pop(key)
            close_stack(engine)
            engine.dispose()


def make_engine(url: str, autocommit: bool = False) -> Engine:
    parsed = make_url(url)
    # No pool_pre_ping: a ping is a round trip per checkout on the hot path. A connection
    # that died (database restart) fails once; SQLAlchemy then invalidates the pool and the
    # caller's retry (outcome writes) or requeue (error handling) gets a fresh one.
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif parsed.get_backend_name() in ("mysql", "mariadb"):
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        # a silent network cut must fail a statement, not hang it forever
        kwargs["connect_args"] = {"connect_timeout": 10, "read_timeout": 120, "write_timeout": 120}
        kwargs.update(pool_recycle=3600, pool_size=10, max_overflow=20)
    else:
        kwargs["connect_args"] = {
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 30000,
        }
        kwargs.update(pool_size=10, max_overflow=20)
    if autocommit:
        kwargs.update(isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
    for key in list(kwargs.get("connect_args", {})):
        if key in parsed.query:  # the URL's own settings win
            del kwargs["connect_args"][key]
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin)
    elif parsed.get_backend_name() in ("mysql", "mariadb"):
        event.listen(engine, "connect", _mysql_on_connect)
    elif engine.dialect.driver == "psycopg":
        event.listen(engine, "handle_error", _psycopg_disconnect)
    return engine


def psycopg_lost(exc: BaseException) -> bool:
    """Whether a psycopg error leaves its connection unusable although psycopg does not
    call the connection broken (SQLAlchemy's own test). That covers an error raised by the
    client itself, which has no SQLSTATE: a send or a read that failed, or a connection
    given back in the middle of another command ("another command is already in
    progress", which would otherwise refuse every statement from then on). It also covers
    a connection-class SQLSTATE (08...) and a server shutdown (57P..). A statement that
    failed, was cancelled (57014) or lost a deadlock (40P01) leaves the connection good."""
    import psycopg

    if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


def _psycopg_disconnect(context: ExceptionContext) -> None:
    """SQLAlchemy's ``handle_error``: a connection ``psycopg_lost`` leaves unusable is
    invalidated with the rest of its pool, as for any disconnect, instead of going back to
    the pool."""
    if not context.is_disconnect and psycopg_lost(context.original_exception):
        context.is_disconnect = True


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN IMMEDIATE ourselves (_sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # Take the write lock at BEGIN: a deferred transaction that reads and then writes can
    # fail with "database is locked" instead of waiting for the busy timeout.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _mysql_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET SESSION time_zone = '+00:00'")
    cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    cur.close()


def now_sql(dialect_name: str) -> ColumnElement[datetime]:
    """The database clock as naive UTC with microseconds, for use inside statements."""
    if dialect_name == "postgresql":
        expr = "(clock_timestamp() AT TIME ZONE 'UTC')"
    elif dialect_name in ("mysql", "mariadb"):
        expr = "UTC_TIMESTAMP(6)"
    else:  # sqlite: %f gives SS.SSS; pad to microseconds like SQLAlchemy's own format
        expr = "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"
    from sqlalchemy import DateTime

    return literal_column(expr, type_=DateTime())


_statement_limits: dict[str, int | None] = {}
STATEMENT_MARGIN = 64 * 1024  # bytes of a statement that are not the handler


def statement_limit(config: Config) -> int | None:
    """The largest statement the database accepts, in bytes (MySQL's
    ``max_allowed_packet``, read once per process), or None where there is no such limit."""
    url = config.database_url
    if url not in _statement_limits:
        engine = get_engine(config)
        limit = None
        if engine.dialect.name in ("mysql", "mariadb"):
            with engine.connect() as conn:
                limit = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
        _statement_limits[url] = limit
    return _statement_limits[url]


def now_plus_sql(dialect_name: str, seconds: float) -> ColumnElement[datetime]:
    """``now_sql`` plus a number of seconds, in SQL."""
    from sqlalchemy import DateTime

    now = str(now_sql(dialect_name))
    if dialect_name == "postgresql":
        expr = f"({now} + interval '{seconds:.6f} seconds')"
    elif dialect_name in ("mysql", "mariadb"):
        expr = f"({now} + INTERVAL {round(seconds * 1_000_000)} MICROSECOND)"
    else:
        expr = f"(strftime('%Y-%m-%d %H:%M:%f', 'now', '{seconds:+.3f} seconds') || '000')"
    return literal_column(expr, type_=DateTime())


def db_now(conn: Connection) -> datetime:
    value = conn.execute(select(now_sql(conn.dialect.name))).scalar_one()
    if isinstance(value, str):  # sqlite returns text
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value


def migrate(config: Config, echo: Any = None) -> int:
    """Create or upgrade the schema; idempotent. Returns the schema version. ``echo``
    (``print`` for the CLI) gets each step before it runs (see ``tomqueue.migration``)."""
    from tomqueue.migration import migrate as run

    return run(config, echo)


def first_line(exc: BaseException) -> str:
    """The first line of a database error, for messages a person reads."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
