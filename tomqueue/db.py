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

from sqlalchemy import Connection, Engine, create_engine, event, inspect, literal_column, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.elements import ColumnElement

from tomqueue.config import Config, redact_url
from tomqueue.errors import DatabaseUnavailable
from tomqueue.schema import SCHEMA_VERSION, Base, SchemaInfo, schema_info

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
    key = (os.getpid(), url, autocommit)
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
    pid = os.getpid()
    with _engines_lock:
        for key in [key for key in _engines if key[0] == pid]:
            _engines.pop(key).dispose()


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
    return engine


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


def db_now(conn: Connection) -> datetime:
    value = conn.execute(select(now_sql(conn.dialect.name))).scalar_one()
    if isinstance(value, str):  # sqlite returns text
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value


def migrate(config: Config, echo: Any = None) -> int:
    """Create or upgrade the schema; idempotent. Returns the schema version."""
    engine = get_engine(config)
    say = echo or (lambda msg: log.info(msg))
    try:
        with engine.begin() as conn:
            existing = set(inspect(conn).get_table_names())
            Base.metadata.create_all(conn)
            created = sorted({t.name for t in Base.metadata.sorted_tables} - existing)
            added = _add_missing_columns(conn)
            row = conn.execute(select(SchemaInfo).where(SchemaInfo.id == 1)).first()
            now = db_now(conn)
            if row is None:
                conn.execute(
                    schema_info.insert().values(id=1, version=SCHEMA_VERSION, migrated_at=now)
                )
            else:
                conn.execute(
                    schema_info.update()
                    .where(SchemaInfo.id == 1)
                    .values(version=SCHEMA_VERSION, migrated_at=now)
                )
    except OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot migrate the database at {redact_url(config.database_url)}: {_first_line(exc)}"
        ) from None
    if created:
        say(f"created tables: {', '.join(created)}")
    if added:
        say(f"added columns: {', '.join(added)}")
    say(f"schema is at version {SCHEMA_VERSION} on {redact_url(config.database_url)}")
    return SCHEMA_VERSION


def _add_missing_columns(conn: Connection) -> list[str]:
    """Upgrade older schemas: add columns the models have and the tables lack."""
    added = []
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl = column.type.compile(dialect=conn.dialect)
            default = column.server_default.arg if column.server_default is not None else None  # type: ignore[attr-defined]
            clause = f" NOT NULL DEFAULT {default}" if default is not None else " NULL"
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {ddl}{clause}")
            added.append(f"{table.name}.{column.name}")
    return added


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
