"""Layer 3's single-row INSERT (``enqueue`` outside a transaction) on a connection kept out
of the pool (``connections.ConnectionStack``): one round trip in autocommit, nothing to roll back.

The statement goes to the driver below its cursor where the driver allows it: a cursor's
parameter machinery costs as much CPU as the rest of ``enqueue`` on our 2-core machines.

- psycopg: libpq's extended protocol through ``pgconn`` — the INSERT prepared once per
  connection (a connection whose ``prepare_threshold`` is None, e.g. behind PgBouncer,
  sends it unprepared), the parameters as text, the wait ``poll()`` on the socket (signal
  handlers run while it waits; if one raises, the statement is cancelled as psycopg
  cancels it on Ctrl-C, and the connection is invalidated).
- PyMySQL: the statement's text with each value written in as PyMySQL would write it
  (integers, naive datetimes and NULL here; strings and anything else by the connection's
  own ``escape``), sent without PyMySQL's argument mapping.
- On psycopg, a value of another type than enqueue stores (int, str, naive datetime,
  None), a NUL in a text or a client encoding other than UTF-8: the driver's cursor.

``DRIVERS`` are the ones this module serves (``persist`` sends other drivers' INSERT
through SQLAlchemy).

Errors are the driver's own exceptions (psycopg builds them from the result); the caller
raises them as SQLAlchemy's ``DBAPIError``.
"""

from __future__ import annotations

import select
from contextlib import suppress
from datetime import datetime
from functools import cache
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.pool import PoolProxiedConnection

from tomqueue.connections import kept_cursor
from tomqueue.schema import SCHEMA_VERSION, jobs

COLUMNS = tuple(c.name for c in jobs.columns if c.name != "id")
_PG_SQL = (
    f"INSERT INTO delayed_jobs ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}) RETURNING id"
).encode()
_PG_NAME = b"tomqueue_insert_job_v%d" % SCHEMA_VERSION
_PREPARED_KEY = "tomqueue_insert_prepared"
_UTF8_KEY = "tomqueue_insert_utf8"
_UNDEFINED_STATEMENT = "26000"  # the prepared statement is gone (DEALLOCATE, DISCARD ALL)
_DUPLICATE_STATEMENT = "42P05"  # it is there already: as good as prepared
_POLLER_KEY = "tomqueue_insert_poller"
_statements: dict[tuple[str, str], str] = {}
# drivers whose parameters need no conversion by SQLAlchemy for our column types
DRIVERS = {("postgresql", "psycopg"), ("mysql", "pymysql"), ("mariadb", "pymysql")}


def insert_one(engine: Engine, raw: PoolProxiedConnection, values: dict[str, Any]) -> int:
    """Insert the row on ``raw`` and return its id."""
    driver = engine.dialect.driver
    if driver == "psycopg" and _utf8(raw):
        params = _pg_params(values)
        if params is not None:
            return _pg_insert(raw, params)
    cursor = kept_cursor(raw)
    if driver == "pymysql":
        cursor.execute(_mysql_statement(raw.driver_connection, statement(engine), values))
        return int(cursor.lastrowid)
    cursor.execute(statement(engine), values)  # psycopg, for what libpq cannot take as is
    return int(cursor.fetchone()[0])


def statement(engine: Engine) -> str:
    """The INSERT's SQL in the driver's own parameter style (RETURNING id on PostgreSQL)."""
    dialect = engine.dialect
    key = (dialect.name, dialect.driver)
    found = _statements.get(key)
    if found is None:
        statement = insert(jobs)
        if dialect.name == "postgresql":
            statement = statement.returning(jobs.c.id)
        compiled = statement.compile(dialect=dialect, column_keys=list(COLUMNS))
        found = _statements[key] = str(compiled)
    return found


# --- PyMySQL ---------------------------------------------------------------------------


def _mysql_statement(connection: Any, sql: str, values: dict[str, Any]) -> str:
    """What PyMySQL's ``cursor.mogrify(sql, values)`` returns, for less: its general
    ``escape`` only for strings and types enqueue does not store."""
    literals: dict[str, str] = {}
    for name, value in values.items():
        kind = type(value)
        if value is None:
            literals[name] = "NULL"
        elif kind is int:
            literals[name] = str(value)
        elif kind is datetime and value.tzinfo is None:
            literals[name] = f"'{value.isoformat(' ')}'"
        else:
            literals[name] = connection.escape(value)
    return sql % literals


# --- psycopg ---------------------------------------------------------------------------


def _utf8(raw: PoolProxiedConnection) -> bool:
    """Whether the connection's client encoding is UTF-8 (the texts are sent as UTF-8;
    with any other encoding the cursor encodes them)."""
    utf8 = raw.info.get(_UTF8_KEY)
    if utf8 is None:
        connection: Any = raw.driver_connection
        utf8 = raw.info[_UTF8_KEY] = connection.info.encoding == "utf-8"
    return bool(utf8)


def _pg_params(values: dict[str, Any]) -> list[bytes | None] | None:
    """The parameters as text in ``COLUMNS`` order; None if one has another type (the
    cursor converts it, with psycopg's own rules)."""
    params: list[bytes | None] = []
    last_time: Any = None  # a new job's timestamps are one datetime: written out once
    last_text = b""
    for name in COLUMNS:
        value = values[name]
        kind = type(value)
        if value is None:
            params.append(None)
        elif kind is int or (kind is str and "\x00" not in value):
            params.append(str(value).encode())  # libpq would cut a text at a NUL
        elif kind is datetime and value.tzinfo is None:
            if value is not last_time:
                last_time, last_text = value, value.isoformat(" ").encode()
            params.append(last_text)
        else:
            return None
    return params


@cache
def _psycopg() -> Any:
    """psycopg's names this module uses (imported on first use: it is optional)."""
    import psycopg
    from psycopg import errors, pq

    return SimpleNamespace(
        Error=psycopg.Error,
        OperationalError=psycopg.OperationalError,
        error_from_result=errors.error_from_result,
        ok=(pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK),
        sqlstate=pq.DiagnosticField.SQLSTATE,
    )


def _pg_insert(raw: PoolProxiedConnection, params: list[bytes | None]) -> int:
    connection: Any = raw.driver_connection
    pgconn = connection.pgconn
    pg = _psycopg()
    try:
        result = _pg_execute(raw, connection, pgconn, params)
        if result is not None and _sqlstate(result) == _UNDEFINED_STATEMENT:
            raw.info.pop(_PREPARED_KEY, None)  # deallocated behind our back: once more
            result = _pg_execute(raw, connection, pgconn, params)
    except pg.Error:
        raise  # the caller's driver_error finds out whether the connection is lost
    except BaseException:  # a signal handler raised while we waited
        with suppress(Exception):
            connection.cancel()  # as psycopg does on Ctrl-C: the row is not written
        raw.invalidate()  # its statement is still in flight: never use it again
        raise
    if result is None:
        raise pg.OperationalError(f"the INSERT got no result: {_message(pgconn)}")
    if result.status not in pg.ok:
        raise pg.error_from_result(result, encoding=connection.info.encoding)
    return int(result.get_value(0, 0))


def _pg_execute(raw: PoolProxiedConnection, connection: Any, pgconn: Any, params: Any) -> Any:
    """Send the INSERT and wait for its result (None if the connection broke)."""
    if connection.prepare_threshold is None:
        pgconn.send_query_params(_PG_SQL, params)
    else:
        if not raw.info.get(_PREPARED_KEY):
            pgconn.send_prepare(_PG_NAME, _PG_SQL)
            prepared = _pg_result(raw, pgconn)
            if prepared is None or _sqlstate(prepared) not in (None, _DUPLICATE_STATEMENT):
                return prepared
            raw.info[_PREPARED_KEY] = True
        pgconn.send_query_prepared(_PG_NAME, params)
    return _pg_result(raw, pgconn)


def _pg_result(raw: PoolProxiedConnection, pgconn: Any) -> Any:
    """Flush, wait until the reply is in, and return its (last) result."""
    poller = raw.info.get(_POLLER_KEY)
    if poller is None:
        poller = raw.info[_POLLER_KEY] = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
    while pgconn.flush():  # non-blocking connection: part of the message is still ours
        writable = select.poll()
        writable.register(pgconn.socket, select.POLLOUT)
        writable.poll(1000)
    while pgconn.is_busy():  # no read before the first wait: the reply is never in yet
        poller.poll()
        pgconn.consume_input()
    result = last = pgconn.get_result()
    while last is not None:
        result, last = last, pgconn.get_result()
    return result


def _sqlstate(result: Any) -> str | None:
    """The error's SQLSTATE ("" if it has none); None for a success."""
    pg = _psycopg()
    if result.status in pg.ok:
        return None
    state = result.error_field(pg.sqlstate)
    return state.decode() if state else ""


def _message(pgconn: Any) -> str:
    return bytes(pgconn.error_message or b"").decode(errors="replace").strip() or "no message"
