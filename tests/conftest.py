"""Shared fixtures.

Services: PostgreSQL, MariaDB and RabbitMQ are *required* — a test that needs one fails
(never skips) when it is down. Override the URLs with TOMQUEUE_TEST_POSTGRES_URL,
TOMQUEUE_TEST_MYSQL_URL and TOMQUEUE_TEST_AMQP_URL.

``stack`` is the behavioural matrix: every database × every transport.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest
from sqlalchemy import delete, text

from tomqueue import config as config_module
from tomqueue.config import LEVELS, Config
from tomqueue.db import dispose_engines, get_engine, migrate
from tomqueue.schema import Job
from tomqueue.transport import close_publishers

POSTGRES_URL = os.environ.get(
    "TOMQUEUE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("TOMQUEUE_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
AMQP_URL = os.environ.get("TOMQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

DATABASES = ("sqlite", "postgresql", "mysql")
TRANSPORTS = ("polling", "amqp")


@dataclass(frozen=True)
class Stack:
    database: str
    transport: str
    config: Config

    @property
    def id(self) -> str:
        return f"{self.database}-{self.transport}"


def database_url(name: str, tmp_path: Path) -> str:
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'tomqueue.sqlite3'}"
    return POSTGRES_URL if name == "postgresql" else MYSQL_URL


def make_config(database: str, transport: str, tmp_path: Path, **overrides: object) -> Config:
    settings: dict[str, object] = dict(
        database_url=database_url(database, tmp_path),
        amqp_url=AMQP_URL if transport == "amqp" else None,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        sleep_delay=0.05,
        stop_grace=5.0,
        timeout_grace=1.0,
    )
    settings.update(overrides)
    return Config(**settings)  # type: ignore[arg-type]


def reset_database(config: Config) -> None:
    migrate(config, echo=lambda _msg: None)
    with get_engine(config).begin() as conn:
        conn.execute(delete(Job))


def delete_broker_objects(config: Config, queue_sets: tuple[str, ...] = ()) -> None:
    """Remove every exchange and queue a test created under its private prefix."""
    if not config.amqp_url:
        return
    connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    try:
        channel = connection.channel()
        names = {f"{config.prefix}.work.deferred"}
        for queue in (config.default_queue, *queue_sets):
            names |= {f"{config.prefix}.{queue}.{level}" for level in LEVELS}
        for name in names:
            channel.queue_delete(name)
        channel.exchange_delete(f"{config.prefix}.work")
        channel.exchange_delete(f"{config.prefix}.work.deferred")
    finally:
        connection.close()


@pytest.fixture(params=[(d, t) for d in DATABASES for t in TRANSPORTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A configured, migrated, empty database and (for amqp) a private broker prefix."""
    database, transport = request.param
    config = make_config(database, transport, tmp_path)
    reset_database(config)
    previous = config_module._current
    config_module.configure(config)
    try:
        yield Stack(database, transport, config)
    finally:
        config_module._current = previous
        close_publishers()
        delete_broker_objects(config, tuple(getattr(request, "queue_sets", ())))
        dispose_engines()


@pytest.fixture
def sqlite_config(tmp_path: Path) -> Iterator[Config]:
    """SQLite + polling, configured as the process default: for fast unit tests."""
    config = make_config("sqlite", "polling", tmp_path)
    reset_database(config)
    previous = config_module._current
    config_module.configure(config)
    yield config
    config_module._current = previous
    close_publishers()
    dispose_engines()


def job_count(config: Config) -> int:
    with get_engine(config).connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM delayed_jobs")).scalar_one())
