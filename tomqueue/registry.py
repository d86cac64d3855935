"""The worker registry and its heartbeat.

A worker registers in ``tomqueue_workers`` before it takes any job and refreshes
``last_seen`` (and the ids it is running) every ``heartbeat_interval``. If it cannot for
``lease_timeout - 2 * heartbeat_interval`` seconds (failed or hung), ``lease_valid()`` turns
False so running jobs are stopped before other workers may take them over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

from sqlalchemy import Engine, delete, insert, update
from sqlalchemy.exc import SQLAlchemyError

from tomqueue.config import Config
from tomqueue.db import db_now, now_sql
from tomqueue.schema import Job, WorkerRecord

log = logging.getLogger("tomqueue.registry")

STALE_RECORDS_AFTER = timedelta(days=1)


class Heartbeat:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        name: str,
        queues: Iterable[str | None],
        current_jobs: Callable[[], list[int]] = list,
    ) -> None:
        self.config = config
        self.engine = engine
        self.name = name
        self.queues = ",".join(q or config.default_queue for q in queues) or config.default_queue
        self.current_jobs = current_jobs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = time.monotonic()

    def register(self) -> None:
        """Write our row; release locks a dead process of the same name left behind."""
        with self.engine.begin() as conn:
            now = db_now(conn)
            conn.execute(
                delete(WorkerRecord).where(
                    (WorkerRecord.name == self.name)
                    | (WorkerRecord.last_seen < now - STALE_RECORDS_AFTER)
                )
            )
            conn.execute(
                insert(WorkerRecord).values(
                    name=self.name,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    queues=self.queues,
                    started_at=now,
                    last_seen=now,
                    current_jobs="[]",
                )
            )
            released = conn.execute(
                update(Job)
                .where(Job.locked_by == self.name)
                .values(locked_at=None, locked_by=None, fence=Job.fence + 1)
            ).rowcount
        if released:
            log.warning(
                "released %d lock(s) left by a dead process named %s",
                released,
                self.name,
                extra={"action": "clear_locks"},
            )
        self._last_ok = time.monotonic()

    def start(self) -> None:
        self.register()
        self._thread = threading.Thread(target=self._run, name="tomqueue-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, keep_record: bool = False) -> None:
        """Stop beating and leave the registry, so our locks are free at once — unless
        ``keep_record``: a job thread still runs, so they must lapse with the lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if keep_record:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(WorkerRecord).where(WorkerRecord.name == self.name))
        except SQLAlchemyError:
            log.warning("could not remove worker %s from the registry", self.name)

    def _run(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval):
            self.beat()

    def beat(self) -> None:
        try:
            with self.engine.begin() as conn:
                found = conn.execute(
                    update(WorkerRecord)
                    .where(WorkerRecord.name == self.name)
                    .values(
                        last_seen=now_sql(self.engine.dialect.name),
                        current_jobs=json.dumps(self.current_jobs()),
                    )
                ).rowcount
            if not found:
                self.register()
            self._last_ok = time.monotonic()
        except SQLAlchemyError as exc:
            log.warning(
                "heartbeat failed (%s); lease valid: %s",
                type(exc).__name__,
                self.lease_valid(),
                extra={"action": "heartbeat_failed"},
            )

    def lease_valid(self) -> bool:
        """False once the heartbeat has failed (or hung) for long enough that other workers
        may soon consider our locks expired: running jobs must stop now."""
        margin = 2 * self.config.heartbeat_interval
        return time.monotonic() - self._last_ok < self.config.lease_timeout - margin
