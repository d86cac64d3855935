"""Layer 3 of the enqueue stack: write job rows.

- Inside the caller's ``Session`` or ``Connection``: in their transaction, nothing else.
- Outside any transaction, one job (``enqueue``): on PostgreSQL and MySQL/MariaDB a single
  ``INSERT`` on an autocommit connection — one round trip, atomic on its own —
  with ``RETURNING id`` (PostgreSQL) or the driver's ``lastrowid`` (MySQL). SQLite (no
  network) keeps a short transaction of its own.
- Outside any transaction, many jobs (``enqueue_many``): one multi-row ``INSERT`` in a
  transaction of our own.

Either way a pooled connection that turns out dead (the database restarted) is retried
once on a fresh one: a statement that failed because its connection was gone did nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, insert
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from tomqueue.config import Config
from tomqueue.connections import connection_stack, driver_error
from tomqueue.db import STATEMENT_MARGIN, get_autocommit_engine, get_engine, statement_limit
from tomqueue.insert_one import COLUMNS, DRIVERS, insert_one, statement
from tomqueue.schema import Job, jobs

T = TypeVar("T")

_SMALL_TEXT = 1024  # MariaDB enqueue_many: a text up to this long may be one parameter


def row_values(job: Job) -> dict[str, Any]:
    """The new row's values (read from the instance's ``__dict__``, where SQLAlchemy keeps
    them: unset columns are NULL)."""
    state = job.__dict__
    return {name: state.get(name) for name in COLUMNS}


def persist(job: Job, target: Session | Connection | None, config: Config) -> None:
    """Write one job row; sets ``job.id``."""
    if isinstance(target, Session):
        target.add(job)
        target.flush()
        return
    values = row_values(job)
    if target is not None:
        key = target.execute(insert(jobs), values).inserted_primary_key
    else:
        engine = get_engine(config)
        if (engine.dialect.name, engine.dialect.driver) in DRIVERS:
            fast = get_autocommit_engine(config)
            _set_id(job, _retrying(lambda: _insert_autocommit(fast, values)))
            return
        key = _retrying(
            lambda: _in_transaction(
                engine, lambda c: c.execute(insert(jobs), values).inserted_primary_key
            )
        )
    assert key is not None
    _set_id(job, key[0])


def persist_many(new: list[Job], target: Session | Connection | None, config: Config) -> None:
    """One multi-row INSERT (``RETURNING id`` in parameter order) for many jobs."""
    if isinstance(target, Session):
        target.add_all(new)
        target.flush()
        return
    engine = target.engine if target is not None else get_engine(config)
    if (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg"):
        _assign_ids(new, _insert_unnest(target, engine, new))
        return
    if _json_table(engine):
        limit = (statement_limit(config) or 0) - STATEMENT_MARGIN
        _assign_ids(new, _insert_json_table(target, engine, new, limit))
        return
    rows = [row_values(job) for job in new]
    statement = insert(jobs).returning(jobs.c.id, sort_by_parameter_order=True)
    if target is None:
        ids = _retrying(
            lambda: _in_transaction(engine, lambda c: c.execute(statement, rows).scalars().all())
        )
    else:
        ids = target.execute(statement, rows).scalars().all()
    _assign_ids(new, ids)


def _assign_ids(new: Sequence[Job], ids: Iterable[int]) -> None:
    for job, job_id in zip(new, ids, strict=True):
        _set_id(job, job_id)


def _set_id(job: Job, job_id: int) -> None:
    """Set straight into the instance, as ``bare_job`` set the rest (the ORM's attribute
    event costs ~0.6 µs): jobs written by our own INSERT are in no ``Session``."""
    job.__dict__["id"] = job_id


_PG_TYPES = {
    c.name: c.type.compile(dialect=postgresql.psycopg.dialect())  # type: ignore[no-untyped-call]
    for c in jobs.columns
    if c.name != "id"
}


def _constant_columns(
    new: list[Job], small_only: bool = False
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The columns whose value is the same in every row (name → value) and the others
    (name → one value per row), in ``COLUMNS`` order. ``small_only``: a long text stays
    with the rows (the MariaDB statement is split by size along its rows)."""
    states = [job.__dict__ for job in new]
    constant: dict[str, Any] = {}
    varying: dict[str, list[Any]] = {}
    for name in COLUMNS:
        values = [state.get(name) for state in states]
        first = values[0]
        same = all(v == first and type(v) is type(first) for v in values)
        if same and not (small_only and isinstance(first, str) and len(first) > _SMALL_TEXT):
            constant[name] = first
        else:
            varying[name] = values
    return constant, varying


def _insert_unnest(target: Connection | None, engine: Engine, new: list[Job]) -> list[int]:
    """PostgreSQL: the rows as one array per column (a column whose value is the same in
    every row as one parameter), ``INSERT ... SELECT ... FROM unnest(...)``. The statement
    stays short — a multi-row ``VALUES`` with 15 placeholders per row is parsed by the
    driver on every call, which costs more than the insert — and the ids come back in row
    order (inserted in ``ORDER BY ord``, numbered in that order by the sequence)."""
    constant, varying = _constant_columns(new)
    chosen = [f"%s::{_PG_TYPES[name]}" if name in constant else f"u.{name}" for name in COLUMNS]
    names = list(varying) or ["unused"]  # unnest needs an array: one of NULLs if need be
    unnest = ", ".join(f"%s::{_PG_TYPES.get(name, 'int')}[]" for name in names)
    arrays = list(varying.values()) or [[None] * len(new)]
    sql = (
        f"INSERT INTO delayed_jobs ({', '.join(COLUMNS)}) SELECT {', '.join(chosen)} "
        f"FROM unnest({unnest}) WITH ORDINALITY AS u({', '.join(names)}, ord) "
        "ORDER BY ord RETURNING id"
    )
    params = (*constant.values(), *arrays)

    def run(conn: Connection) -> list[int]:
        return sorted(int(row[0]) for row in conn.exec_driver_sql(sql, params))

    if target is not None:
        return run(target)
    return _retrying(lambda: _in_transaction(engine, run))


_MARIADB_TYPES = {
    c.name: ("LONGTEXT" if "TEXT" in t else t)
    for c in jobs.columns
    if c.name != "id"
    for t in [str(c.type.compile(dialect=mysql.dialect()))]
}


def _json_table(engine: Engine) -> bool:
    dialect = engine.dialect
    version = getattr(dialect, "server_version_info", None) or ()
    return bool(getattr(dialect, "is_mariadb", False)) and tuple(version) >= (10, 6)


def _insert_json_table(
    target: Connection | None, engine: Engine, new: list[Job], limit: int
) -> list[int]:
    """MariaDB: ``INSERT ... SELECT ... FROM JSON_TABLE(...) RETURNING id`` — a column
    whose (short) value is the same in every row is one parameter, the others travel as
    one JSON document of rows, which the driver escapes once, not 15 parameters per row;
    as many statements as ``max_allowed_packet`` (``limit``) requires, in one transaction;
    the ids come back in row order (``ORDER BY ord``)."""
    constant, varying = _constant_columns(new, small_only=True)
    columns = "".join(
        f", {name} {_MARIADB_TYPES[name]} PATH '$[{i}]'" for i, name in enumerate(varying)
    )
    chosen = ["%s" if name in constant else f"j.{name}" for name in COLUMNS]
    sql = (
        f"INSERT INTO delayed_jobs ({', '.join(COLUMNS)}) "
        f"SELECT {', '.join(chosen)} FROM JSON_TABLE(%s, '$[*]' "
        f"COLUMNS (ord FOR ORDINALITY{columns})) AS j ORDER BY j.ord RETURNING id"
    )
    scalars = tuple(constant.values())
    rows = [list(row) for row in zip(*varying.values(), strict=True)] or [[]] * len(new)
    documents = _json_documents(rows, limit - len(_dumps(scalars)))

    def run(conn: Connection) -> list[int]:
        ids: list[int] = []
        for document in documents:
            ids += sorted(int(row[0]) for row in conn.exec_driver_sql(sql, (*scalars, document)))
        return ids

    if target is not None:
        return run(target)
    return _retrying(lambda: _in_transaction(engine, run))


def _json_documents(rows: list[list[Any]], limit: int) -> list[str]:
    """The rows as JSON arrays of rows, each document under ``limit`` bytes when it can be
    (one ``json.dumps`` for the whole batch when it fits, the common case)."""
    whole = _dumps(rows)
    if len(whole.encode()) <= limit:
        return [whole]
    documents: list[str] = []
    parts: list[str] = []
    size = 0
    for values in rows:
        row = _dumps(values)
        if parts and size + len(row) + 1 > limit:
            documents.append(f"[{','.join(parts)}]")
            parts, size = [], 0
        parts.append(row)
        size += len(row) + 1
    documents.append(f"[{','.join(parts)}]")
    return documents


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_value)


def _json_value(value: Any) -> Any:
    """What JSON cannot hold by itself: datetimes (``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _retrying(work: Callable[[], T]) -> T:
    """Run ``work`` once more if its pooled connection turned out dead (database
    restarted): nothing was written, so retrying is safe, and the caller should not see an
    error a second attempt would not raise."""
    try:
        return work()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return work()


def _in_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.begin() as conn:
        return work(conn)


def _insert_autocommit(engine: Engine, values: dict[str, Any]) -> int:
    """One INSERT on an autocommit connection kept out of the pool between calls
    (``ConnectionStack``), below SQLAlchemy and, where the driver allows, below its cursor
    (``insert_one``); a driver error is raised as SQLAlchemy's ``DBAPIError``, as any
    other statement's would be. Any other exception (a signal handler's, raised while the
    INSERT waited) may have left the statement halfway: that connection is closed for good."""
    error = engine.dialect.loaded_dbapi.Error
    stack = connection_stack(engine)
    try:
        raw = stack.take()
    except error as exc:  # cannot connect
        raise driver_error(engine, None, exc, None, None) from exc
    try:
        new_id = insert_one(engine, raw, values)
    except error as exc:
        wrapped = driver_error(engine, raw, exc, statement(engine), values)  # lost: invalidated
        stack.give_back(raw, failed=True)
        raise wrapped from exc
    except BaseException:
        if raw.is_valid:
            raw.invalidate()
        stack.give_back(raw, failed=True)
        raise
    stack.give_back(raw)
    return new_id
