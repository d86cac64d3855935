"""One database + broker under test: its config, a clean slate between runs, and the
environment of the subprocesses that work on it."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pika
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

from tomqueue.config import LEVELS, Config
from tomqueue.db import get_engine, migrate
from tomqueue.topology import Topology
from tomqueue.transport.amqp import declare_deferred, declare_work

REPO_ROOT = Path(__file__).resolve().parent.parent
DJ_INDEX = "delayed_jobs_priority"  # Delayed::Job's own migration: (priority, run_at)


@dataclass(frozen=True)
class Target:
    """A database (``postgresql`` or ``mysql``), the broker and a private prefix."""

    name: str
    url: str
    amqp_url: str
    prefix: str
    workdir: Path

    @property
    def config(self) -> Config:
        return Config(database_url=self.url, amqp_url=self.amqp_url, prefix=self.prefix)

    @property
    def engine(self) -> Engine:
        return get_engine(self.config)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a ``tomqueue`` or baseline subprocess on this target."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOMQUEUE_")}
        env.update(
            TOMQUEUE_DATABASE_URL=self.url,
            TOMQUEUE_AMQP_URL=self.amqp_url,
            TOMQUEUE_PREFIX=self.prefix,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        )
        env.update(extra)
        return env

    def path(self, name: str) -> Path:
        """A file in this target's scratch directory (logs, ledgers)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir / f"{self.name}-{name}"


def create_database_if_missing(url: str) -> None:
    """``tomqueue_bench`` (the default) may not exist yet: create it."""
    parsed = make_url(url)
    database = parsed.database
    if not database:
        return
    from sqlalchemy import create_engine

    if parsed.get_backend_name() == "postgresql":
        admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
            ).first()
            if not found:
                conn.execute(text(f'CREATE DATABASE "{database}"'))
    else:
        admin = create_engine(parsed.set(database=""))
        with admin.begin() as conn:
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{database}`"))
    admin.dispose()


def prepare(target: Target, dj_index: bool) -> None:
    """Migrate, add Delayed::Job's (priority, run_at) index, empty table and queues."""
    create_database_if_missing(target.url)
    migrate(target.config, echo=lambda _msg: None)
    if dj_index:
        create_dj_index(target.engine)
    reset(target)


def create_dj_index(engine: Engine) -> None:
    with engine.begin() as conn:
        names = {ix["name"] for ix in inspect(conn).get_indexes("delayed_jobs")}
        if DJ_INDEX not in names:
            conn.execute(text(f"CREATE INDEX {DJ_INDEX} ON delayed_jobs (priority, run_at)"))


def drop_dj_index(engine: Engine) -> None:
    """Leave the schema as ``tomqueue migrate`` made it."""
    with engine.begin() as conn:
        names = {ix["name"] for ix in inspect(conn).get_indexes("delayed_jobs")}
        if DJ_INDEX in names:
            on = "" if engine.dialect.name == "postgresql" else " ON delayed_jobs"
            conn.execute(text(f"DROP INDEX {DJ_INDEX}{on}"))


def reset(target: Target) -> None:
    """Empty ``delayed_jobs`` (ids restart at 1), the worker registry and the queues."""
    with target.engine.begin() as conn:
        if target.dialect == "postgresql":
            conn.execute(text("TRUNCATE delayed_jobs RESTART IDENTITY"))
        else:
            conn.execute(text("TRUNCATE TABLE delayed_jobs"))
        conn.execute(text("DELETE FROM tomqueue_workers"))
        conn.execute(text("DELETE FROM tomqueue_leases"))
    if target.dialect == "postgresql":
        with target.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE delayed_jobs"))
    purge_broker(target)


def analyze(target: Target) -> None:
    """Fresh planner statistics after a bulk load (as autovacuum would give soon after)."""
    if target.dialect == "postgresql":
        with target.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE delayed_jobs"))
    else:
        with target.engine.begin() as conn:
            conn.execute(text("ANALYZE TABLE delayed_jobs"))


@contextlib.contextmanager
def channel(target: Target):  # type: ignore[no-untyped-def]
    connection = pika.BlockingConnection(pika.URLParameters(target.amqp_url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def work_queues(target: Target) -> list[str]:
    topology = Topology.of(target.config)
    return [topology.queue_name(None, level) for level in LEVELS]


def purge_broker(target: Target) -> None:
    """Declare the default queue set and the deferred queue, and empty them."""
    topology = Topology.of(target.config)
    with channel(target) as ch:
        declare_work(ch, topology, None)
        declare_deferred(ch, topology)
        for name in [*work_queues(target), topology.deferred_queue]:
            ch.queue_purge(name)


def delete_broker_objects(target: Target) -> None:
    topology = Topology.of(target.config)
    with channel(target) as ch:
        for name in [*work_queues(target), topology.deferred_queue]:
            ch.queue_delete(name)
        ch.exchange_delete(topology.work_exchange)
        ch.exchange_delete(topology.deferred_exchange)


def consumers(target: Target, queue: str) -> int:
    with channel(target) as ch:
        return int(ch.queue_declare(queue, passive=True).method.consumer_count)


def count_jobs(target: Target, where: str = "", **params: object) -> int:
    sql = "SELECT COUNT(*) FROM delayed_jobs" + (f" WHERE {where}" if where else "")
    with target.engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def table_empty(target: Target) -> bool:
    with target.engine.connect() as conn:
        return conn.execute(text("SELECT id FROM delayed_jobs LIMIT 1")).first() is None


def versions(target: Target) -> dict[str, str]:
    with target.engine.connect() as conn:
        server = str(conn.execute(text("SELECT version()")).scalar_one())
    connection = pika.BlockingConnection(pika.URLParameters(target.amqp_url))
    try:
        props = connection._impl.server_properties
        rabbit = props.get("version", b"?")
    finally:
        connection.close()
    return {
        "database": server.split(" on ")[0][:80],
        "rabbitmq": rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit),
        "python": sys.version.split()[0],
    }
