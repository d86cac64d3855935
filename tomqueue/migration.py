"""``tomqueue migrate``: create or upgrade the schema, one announced step at a time.

The plan is read from the database first: tables to create, columns to add to older
tables, indexes they lack or no longer need, PostgreSQL's fillfactor. Each step is
printed (and flushed) *before* it runs, with the table's approximate row count where it
is an existing table — an ``ALTER TABLE`` or a ``CREATE INDEX`` on a big table can take a
while or wait for a lock — then its duration; a summary ends the run. Running it again
finds nothing to do (idempotent), on PostgreSQL, MySQL/MariaDB and SQLite alike.

Everything happens in one transaction: on PostgreSQL and SQLite a failure leaves the
schema as it was; MySQL/MariaDB commit each DDL statement as it comes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Column, Connection, Index, Table, inspect, select, text
from sqlalchemy.exc import OperationalError

from tomqueue.config import Config, redact_url
from tomqueue.db import db_now, first_line, get_engine
from tomqueue.errors import DatabaseUnavailable
from tomqueue.schema import (
    FILLFACTOR,
    OBSOLETE_INDEXES,
    SCHEMA_VERSION,
    Base,
    SchemaInfo,
    schema_info,
)

log = logging.getLogger("tomqueue.db")

Echo = Callable[[str], object]


@dataclass(frozen=True)
class Step:
    kind: str  # "table", "column", "index", "drop" or "option"
    what: str  # what the person reads before it runs
    run: Callable[[Connection], object]


def migrate(config: Config, echo: Echo | None = None) -> int:
    """Create or upgrade the schema; idempotent. Returns the schema version."""
    say: Echo = echo or log.info
    where = redact_url(config.database_url)
    started = time.monotonic()
    say(f"migrating {where} to schema version {SCHEMA_VERSION}")
    try:
        with get_engine(config).begin() as conn:
            steps = plan(conn)
            for step in steps:
                say(f"{step.what} ...")
                began = time.monotonic()
                step.run(conn)
                say(f"  done in {time.monotonic() - began:.3f} s")
            _stamp(conn)
    except OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot migrate the database at {where}: {first_line(exc)}"
        ) from None
    say(_summary(steps, time.monotonic() - started))
    say(f"schema is at version {SCHEMA_VERSION} on {where}")
    return SCHEMA_VERSION


def plan(conn: Connection) -> list[Step]:
    """What this database lacks, in dependency order."""
    inspector = inspect(conn)
    existing = set(inspector.get_table_names())
    steps: list[Step] = []
    for table in Base.metadata.sorted_tables:
        if table.name not in existing:
            steps.append(_create_table(table))
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in present]
        indexed = {i["name"] for i in inspector.get_indexes(table.name)}
        lacking = [i for i in table.indexes if i.name not in indexed]
        obsolete = [n for n in OBSOLETE_INDEXES.get(table.name, ()) if n in indexed]
        if missing or lacking or obsolete:
            rows = _rows(conn, table.name)
            steps += [_add_column(table, column, rows) for column in missing]
            steps += [_create_index(index, rows) for index in lacking]
            steps += [_drop_index(table, name) for name in obsolete]
    if conn.dialect.name == "postgresql" and not _has_fillfactor(conn):
        steps.append(_set_fillfactor())
    return steps


def _create_table(table: Table) -> Step:
    indexes = f" with {len(table.indexes)} index(es)" if table.indexes else ""
    return Step("table", f"creating table {table.name}{indexes}", table.create)


def _add_column(table: Table, column: Column[object], rows: str) -> Step:
    def run(conn: Connection) -> None:
        ddl = column.type.compile(dialect=conn.dialect)
        default = column.server_default.arg if column.server_default is not None else None  # type: ignore[attr-defined]
        clause = f" NOT NULL DEFAULT {default}" if default is not None else " NULL"
        conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {ddl}{clause}")

    return Step("column", f"adding column {table.name}.{column.name} ({rows})", run)


def _create_index(index: Index, rows: str) -> Step:
    table = index.table
    assert table is not None
    columns = ", ".join(c.name for c in index.columns)
    return Step(
        "index", f"creating index {index.name} on {table.name} ({columns}) ({rows})", index.create
    )


def _drop_index(table: Table, name: str) -> Step:
    def run(conn: Connection) -> None:
        on = f" ON {table.name}" if conn.dialect.name in ("mysql", "mariadb") else ""
        conn.exec_driver_sql(f"DROP INDEX {name}{on}")

    return Step("drop", f"dropping index {name} on {table.name} (no longer used)", run)


def _has_fillfactor(conn: Connection) -> bool:
    options = conn.exec_driver_sql(
        "SELECT reloptions FROM pg_class WHERE oid = to_regclass('delayed_jobs')"
    ).scalar_one_or_none()
    return f"fillfactor={FILLFACTOR}" in (options or [])


def _set_fillfactor() -> Step:
    """Room on each page for a lock's update of a row (applies to pages written from now)."""
    sql = f"ALTER TABLE delayed_jobs SET (fillfactor = {FILLFACTOR})"
    return Step(
        "option",
        f"setting fillfactor {FILLFACTOR} on delayed_jobs",
        lambda conn: conn.exec_driver_sql(sql),
    )


def _rows(conn: Connection, table: str) -> str:
    """The table's size as the database estimates it (a COUNT(*) would be a step itself)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        query = (
            "SELECT reltuples::bigint, pg_total_relation_size(oid) FROM pg_class "
            "WHERE oid = to_regclass(:t)"
        )
    elif dialect in ("mysql", "mariadb"):
        query = (
            "SELECT table_rows, data_length + index_length FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = :t"
        )
    else:  # SQLite: an embedded development database, counted exactly
        count = conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
        return _plural(int(count), "row")
    row = conn.execute(text(query), {"t": table}).one()
    rows = (
        "row count unknown" if row[0] is None or row[0] < 0 else f"about {_plural(row[0], 'row')}"
    )
    return f"{rows}, {int(row[1] or 0) / 1e6:,.1f} MB"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _stamp(conn: Connection) -> None:
    now = db_now(conn)
    row = conn.execute(select(SchemaInfo).where(SchemaInfo.id == 1)).first()
    if row is None:
        conn.execute(schema_info.insert().values(id=1, version=SCHEMA_VERSION, migrated_at=now))
    else:
        conn.execute(
            schema_info.update()
            .where(SchemaInfo.id == 1)
            .values(version=SCHEMA_VERSION, migrated_at=now)
        )


def _summary(steps: list[Step], seconds: float) -> str:
    if not steps:
        return f"nothing to do: the schema is up to date (checked in {seconds:.2f} s)"
    kinds = Counter(step.kind for step in steps)
    done = [
        f"{kinds[kind]} {label}"
        for kind, label in (
            ("table", "table(s) created"),
            ("column", "column(s) added"),
            ("index", "index(es) created"),
            ("drop", "index(es) dropped"),
            ("option", "table option(s) set"),
        )
        if kinds[kind]
    ]
    return f"migrated in {seconds:.2f} s: {', '.join(done)}"
