"""``tomqueue migrate`` upgrades an older schema in place and is idempotent."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.conftest import Stack, on_stacks
from tomqueue.db import get_engine, migrate

STACKS = (("sqlite", "polling"), ("postgresql", "polling"), ("mysql", "polling"))


def index_columns(stack: Stack) -> dict[str, list[str]]:
    with get_engine(stack.config).connect() as conn:
        found = inspect(conn).get_indexes("delayed_jobs")
    return {ix["name"]: list(ix["column_names"]) for ix in found}  # type: ignore[misc]


@on_stacks(*STACKS)
def test_the_schema_2_index_on_lock_columns_is_replaced(stack: Stack) -> None:
    """Schema 2 indexed (failed_at, locked_at, run_at): every lock rewrote an index entry.
    Schema 3 indexes (failed_at, run_at) only."""
    on = " ON delayed_jobs" if stack.database == "mysql" else ""
    with get_engine(stack.config).begin() as conn:
        conn.exec_driver_sql(f"DROP INDEX ix_delayed_jobs_due{on}")
        conn.exec_driver_sql(
            "CREATE INDEX ix_delayed_jobs_sweep ON delayed_jobs (failed_at, locked_at, run_at)"
        )
    said: list[str] = []

    migrate(stack.config, echo=said.append)
    migrate(stack.config, echo=said.append)

    indexes = index_columns(stack)
    assert "ix_delayed_jobs_sweep" not in indexes
    assert indexes["ix_delayed_jobs_due"] == ["failed_at", "run_at"]
    assert not any("locked_at" in columns for columns in indexes.values())
    assert sum("dropping index ix_delayed_jobs_sweep" in line for line in said) == 1


@on_stacks(("postgresql", "polling"))
def test_postgresql_table_leaves_room_for_hot_updates(stack: Stack) -> None:
    with get_engine(stack.config).connect() as conn:
        options = conn.exec_driver_sql(
            "SELECT reloptions FROM pg_class WHERE relname = 'delayed_jobs'"
        ).scalar_one()
    assert "fillfactor=85" in (options or [])
