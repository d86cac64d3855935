"""When is a lock still held? And named leases for periodic tasks.

A job's lock is *held* while its ``locked_by`` worker keeps heartbeating (seen within
``lease_timeout``) and the lock is younger than ``max_run_time``. Otherwise it is expired:
the worker died, hung, or lost the database, and the job may be taken over.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from tomqueue.config import Config
from tomqueue.schema import Job, Lease, WorkerRecord


def live_workers_since(now: datetime, config: Config) -> datetime:
    return now - timedelta(seconds=config.lease_timeout)


def lock_is_free(now: datetime, config: Config) -> ColumnElement[bool]:
    """SQL condition: the row is unlocked or its lock has expired."""
    alive = select(WorkerRecord.name).where(
        WorkerRecord.last_seen >= live_workers_since(now, config)
    )
    return or_(
        Job.locked_at.is_(None),
        Job.locked_at < now - timedelta(seconds=config.max_run_time),
        Job.locked_by.not_in(alive),
    )


def holder_alive(conn: Connection, locked_by: str | None, now: datetime, config: Config) -> bool:
    if locked_by is None:
        return False
    seen = conn.execute(
        select(WorkerRecord.last_seen).where(WorkerRecord.name == locked_by)
    ).scalar_one_or_none()
    if isinstance(seen, str):
        seen = datetime.fromisoformat(seen)
    return seen is not None and seen >= live_workers_since(now, config)


def try_acquire(conn: Connection, name: str, holder: str, ttl: float, now: datetime) -> bool:
    """Take (or renew) the lease ``name`` for ``ttl`` seconds; False if someone else has it."""
    until = now + timedelta(seconds=ttl)
    taken = conn.execute(
        update(Lease)
        .where(Lease.name == name, or_(Lease.expires_at < now, Lease.holder == holder))
        .values(holder=holder, expires_at=until)
    ).rowcount
    if taken:
        return True
    try:
        with conn.begin_nested():
            conn.execute(insert(Lease).values(name=name, holder=holder, expires_at=until))
    except IntegrityError:
        return False
    return True
