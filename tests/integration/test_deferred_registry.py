"""The deferred manager's registry row (issue 3 req. 5): written, refreshed, removed, and
never a reason for the manager to stop releasing jobs when the database misbehaves."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text

from deferred.registry import Holdings, ManagerRecord
from tomqueue.config import Config
from tomqueue.db import dispose_engines, get_engine, migrate
from tomqueue.schema import DeferredManagerRecord


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    path = tmp_path / "db.sqlite3"
    with get_engine(Config(database_url=f"sqlite:///{path}")).begin() as conn:
        conn.execute(text("CREATE TABLE unrelated (x INTEGER)"))  # a database, not migrated
    yield Config(database_url=f"sqlite:///{path}", heartbeat_interval=0.2, lease_timeout=1)
    dispose_engines()


def rows(config: Config) -> list[DeferredManagerRecord]:
    with get_engine(config).connect() as conn:
        return list(conn.execute(select(DeferredManagerRecord.__table__)).all())  # type: ignore


def test_the_row_follows_the_manager_and_a_missing_table_is_reported_once(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deferred")
    holdings = Holdings(0, None, 0)
    record = ManagerRecord(config, "host:h pid:1", "tq.work.deferred", lambda: holdings)
    record.refresh()
    record.refresh()
    failures = [r for r in caplog.records if r.action == "deferred_registry_failed"]  # type: ignore[attr-defined]
    assert len(failures) == 1 and "tomqueue migrate" in failures[0].getMessage()

    migrate(config, echo=lambda _m: None)
    holdings = Holdings(7, datetime(2031, 1, 2, 3, 4, 5, 678901), 12)
    record.refresh()
    [row] = rows(config)
    assert (row.name, row.queue, row.pid) == ("host:h pid:1", "tq.work.deferred", os.getpid())
    assert (row.held, row.next_due, row.published) == (7, holdings.next_due, 12)
    assert "registry row written again" in caplog.text

    holdings = Holdings(3, None, 16)
    record.refresh()
    [row] = rows(config)
    assert (row.held, row.next_due, row.published) == (3, None, 16)
    assert row.last_seen >= row.started_at

    record.start()  # the thread refreshes; stop removes the row
    record.stop()
    assert rows(config) == []


def test_no_database_file_means_no_registry_and_no_file_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.sqlite3"
    record = ManagerRecord(
        Config(database_url=f"sqlite:///{path}"), "n", "q", lambda: Holdings(0, None, 0)
    )
    record.start()
    record.stop()
    assert not path.exists()
