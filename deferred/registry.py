"""The deferred manager's row in ``tomqueue_deferred_managers``: what ``tomqueue status`` shows.

A manager registers when it starts and, every ``heartbeat_interval``, refreshes
``last_seen``, how many deliveries it holds, the ``run_at`` of the earliest one and how many
it has published; it removes its row when it exits cleanly. A row whose ``last_seen`` is
older than ``lease_timeout`` belongs to a manager that died (``kill -9``, lost host);
``tomqueue status`` marks it DEAD and the next manager to start deletes rows older than a day.

The database is only a window onto the manager: while it cannot be reached (or
``tomqueue migrate`` has not created the table yet) the manager keeps releasing jobs, logs
the problem once, and tries again at the next refresh.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import Engine, delete, insert, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from tomqueue.config import Config, redact_url
from tomqueue.db import db_now, first_line, get_engine, now_sql
from tomqueue.schema import DeferredManagerRecord as Record

log = logging.getLogger("deferred")

STALE_RECORDS_AFTER = timedelta(days=1)


class Holdings(NamedTuple):
    held: int
    next_due: datetime | None
    published: int


class ManagerRecord:
    """Keeps one manager's registry row fresh from a background thread."""

    def __init__(
        self, config: Config, name: str, queue: str, report: Callable[[], Holdings]
    ) -> None:
        self.config = config
        self.name = name
        self.queue = queue
        self.report = report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False
        self._failing = False
        self._started_at: datetime | None = None

    def start(self) -> None:
        if not _database_exists(self.config.database_url):
            log.info(
                "no database at %s: this manager is not listed by tomqueue status",
                redact_url(self.config.database_url),
                extra={"action": "deferred_unregistered"},
            )
            return
        self._thread = threading.Thread(target=self._run, name="deferred-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and remove the row (a clean exit)."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=5)
        try:
            with self._engine().begin() as conn:
                conn.execute(delete(Record).where(Record.name == self.name))
        except SQLAlchemyError as exc:
            log.warning(
                "could not remove deferred manager %s from the registry: %s",
                self.name,
                type(exc).__name__,
                extra={"action": "deferred_registry_failed"},
            )

    def _run(self) -> None:
        self.refresh()
        while not self._stop.wait(self.config.heartbeat_interval):
            self.refresh()

    def refresh(self) -> None:
        """Write the current holdings (registering first if needed); never raises."""
        try:
            if not self._registered or not self._update():
                self._register()
            if self._failing:
                log.info("registry row written again", extra={"action": "deferred_registry"})
            self._failing = False
        except SQLAlchemyError as exc:
            self._registered = False
            if not self._failing:
                log.warning(
                    "cannot write this manager's row in %s (%s: %s); releasing jobs goes on, "
                    "tomqueue status will not list it until this works (tomqueue migrate?)",
                    Record.__tablename__,
                    type(exc).__name__,
                    first_line(exc),
                    extra={"action": "deferred_registry_failed"},
                )
            self._failing = True

    def _engine(self) -> Engine:
        return get_engine(self.config)

    def _update(self) -> bool:
        holdings = self.report()
        with self._engine().begin() as conn:
            found = conn.execute(
                update(Record)
                .where(Record.name == self.name)
                .values(
                    last_seen=now_sql(conn.dialect.name),
                    held=holdings.held,
                    next_due=holdings.next_due,
                    published=holdings.published,
                )
            ).rowcount
        return bool(found)

    def _register(self) -> None:
        holdings = self.report()
        with self._engine().begin() as conn:
            now = db_now(conn)
            conn.execute(
                delete(Record).where(
                    (Record.name == self.name) | (Record.last_seen < now - STALE_RECORDS_AFTER)
                )
            )
            conn.execute(
                insert(Record).values(
                    name=self.name,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    queue=self.queue,
                    started_at=self._started_at or now,
                    last_seen=now,
                    **holdings._asdict(),
                )
            )
        self._started_at = self._started_at or now
        self._registered = True


def _database_exists(url: str) -> bool:
    """False for a SQLite file that does not exist: connecting would create it."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return True
    return os.path.exists(parsed.database or "")
