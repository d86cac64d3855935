"""The ``delayed_jobs`` table: Delayed::Job's columns plus what TomQueue needs.

Extra columns:
- ``version``: the notification generation. Bumped whenever the job is (re)scheduled; a
  message carries it as ``delayed_job_digest`` and a message whose version differs is stale.
- ``fence``: the fencing token. Bumped by every lock and every outcome; each write after a
  lock is conditioned on the value the lock produced, so an old lock holder cannot overwrite
  a newer outcome.
- ``notified_at``: when a notification for the current version was last published (the
  sweeper's "not notified recently").
- ``crashes``: how many times a worker died while running the job (also counted in
  ``attempts``); past ``max_crashes`` the job is failed instead of run again.

``tomqueue_workers`` is the registry of live workers (heartbeats): a lock whose ``locked_by``
has not been seen for ``lease_timeout`` seconds is expired. ``tomqueue_deferred_managers``
is the same for deferred managers, with what each holds (``tomqueue status`` shows it).
``tomqueue_leases`` holds named leases that let several processes take turns at a periodic
task (the sweeper).

Timestamps are naive UTC with microseconds on every database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, class_mapper, mapped_column

SCHEMA_VERSION = 3
FILLFACTOR = 85  # PostgreSQL: room on each page for the lock's update of a row
OBSOLETE_INDEXES = {"delayed_jobs": ("ix_delayed_jobs_sweep",)}  # dropped by migrate

_ID = BigInteger().with_variant(Integer(), "sqlite")
_TIME = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


class Base(DeclarativeBase):
    metadata = MetaData()


class Job(Base):
    """A live job (Delayed::Job's model). Completed jobs are deleted."""

    __tablename__ = "delayed_jobs"
    __table_args__: Any = (
        # The sweeper's and the dashboard's "due and not failed". No index holds the lock
        # columns: locking and unlocking then rewrite no index entry (PostgreSQL makes them
        # HOT updates, with the room ``fillfactor`` leaves on each page).
        Index("ix_delayed_jobs_due", "failed_at", "run_at"),
        Index("ix_delayed_jobs_queue", "queue", "priority"),
        {
            "mysql_charset": "utf8mb4",
            "mysql_collate": "utf8mb4_bin",
            "postgresql_with": {"fillfactor": FILLFACTOR},
        },
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    handler: Mapped[str] = mapped_column(_LONG_TEXT, nullable=False)
    last_error: Mapped[str | None] = mapped_column(_LONG_TEXT, nullable=True)
    run_at: Mapped[datetime] = mapped_column(_TIME, nullable=False)
    locked_at: Mapped[datetime | None] = mapped_column(_TIME, nullable=True)
    locked_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(_TIME, nullable=True)
    queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(_TIME, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(_TIME, nullable=False)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False, default=1)
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    notified_at: Mapped[datetime | None] = mapped_column(_TIME, nullable=True)
    crashes: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")

    def __repr__(self) -> str:
        return (
            f"<Job id={self.id} queue={self.queue} priority={self.priority} "
            f"attempts={self.attempts} run_at={self.run_at} version={self.version}>"
        )

    @property
    def name(self) -> str:
        """The payload's kind (``module:QualName``), like Delayed::Job's ``name``."""
        from tomqueue.handler import handler_kind

        return handler_kind(self.handler)


def bare_job(values: dict[str, Any]) -> Job:
    """A ``Job`` holding ``values`` set straight into the instance, without the ORM's
    attribute events (a tenth of the cost of ``Job(**values)``): for rows our own
    statements write or read, never added to a ``Session``."""
    job: Job = _JOB_MANAGER.new_instance()
    job.__dict__.update(values)
    return job


_JOB_MANAGER = class_mapper(Job).class_manager


class WorkerRecord(Base):
    """A running worker process, kept fresh by its heartbeat."""

    __tablename__ = "tomqueue_workers"
    __table_args__: Any = {"mysql_charset": "utf8mb4"}

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    queues: Mapped[str] = mapped_column(String(1000), nullable=False, default="")
    started_at: Mapped[datetime] = mapped_column(_TIME, nullable=False)
    last_seen: Mapped[datetime] = mapped_column(_TIME, nullable=False, index=True)
    current_jobs: Mapped[str] = mapped_column(Text, nullable=False, default="[]")


class DeferredManagerRecord(Base):
    """A running deferred manager: what it holds, refreshed every ``heartbeat_interval``."""

    __tablename__ = "tomqueue_deferred_managers"
    __table_args__: Any = {"mysql_charset": "utf8mb4"}

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    queue: Mapped[str] = mapped_column(String(255), nullable=False)
    started_at: Mapped[datetime] = mapped_column(_TIME, nullable=False)
    last_seen: Mapped[datetime] = mapped_column(_TIME, nullable=False, index=True)
    held: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    next_due: Mapped[datetime | None] = mapped_column(_TIME, nullable=True)
    published: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0"
    )


class Lease(Base):
    """A named lease: who may run a periodic task until when."""

    __tablename__ = "tomqueue_leases"
    __table_args__: Any = {"mysql_charset": "utf8mb4"}

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(_TIME, nullable=False)
    # JSON: what the holder's last run reported (the sweeper: see tomqueue.sweep_report)
    report: Mapped[str | None] = mapped_column(Text, nullable=True)


class SchemaInfo(Base):
    """One row: the schema version ``tomqueue migrate`` last brought the database to."""

    __tablename__ = "tomqueue_schema"
    __table_args__: Any = {"mysql_charset": "utf8mb4"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    migrated_at: Mapped[datetime] = mapped_column(_TIME, nullable=False)


jobs: Table = Job.__table__  # type: ignore[assignment]
schema_info: Table = SchemaInfo.__table__  # type: ignore[assignment]
workers: Table = WorkerRecord.__table__  # type: ignore[assignment]
deferred_managers: Table = DeferredManagerRecord.__table__  # type: ignore[assignment]
leases: Table = Lease.__table__  # type: ignore[assignment]
