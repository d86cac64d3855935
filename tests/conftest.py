"""Shared fixtures.

Services: PostgreSQL, MariaDB and RabbitMQ are *required* — a test that needs one fails
(never skips) when it is down. Override the URLs with TOMQUEUE_TEST_POSTGRES_URL,
TOMQUEUE_TEST_MYSQL_URL and TOMQUEUE_TEST_AMQP_URL.

``stack`` is the behavioural matrix: every database x every transport.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
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

DATABASES = tuple(
    d.strip()
    for d in os.environ.get("TOMQUEUE_TEST_DATABASES", "sqlite,postgresql,mysql").split(",")
    if d.strip()
)
TRANSPORTS = ("polling", "amqp")
REPO_ROOT = Path(__file__).resolve().parent.parent
NAMED_QUEUE_SETS = ("mail",)  # named Delayed::Job queues the tests use (cleaned up)


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
        for table in ("tomqueue_workers", "tomqueue_deferred_managers", "tomqueue_leases"):
            if table in Job.metadata.tables:
                conn.execute(delete(Job.metadata.tables[table]))


def delete_broker_objects(config: Config, queue_sets: tuple[str, ...] = ()) -> None:
    """Remove every exchange and queue a test created under its private prefix."""
    if not config.amqp_url:
        return
    connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    try:
        channel = connection.channel()
        names = {f"{config.prefix}.work.deferred"}
        for queue in (config.default_queue, *NAMED_QUEUE_SETS, *queue_sets):
            names |= {f"{config.prefix}.{queue}.{level}" for level in LEVELS}
        for name in names:
            channel.queue_delete(name)
        channel.exchange_delete(f"{config.prefix}.work")
        channel.exchange_delete(f"{config.prefix}.work.deferred")
    finally:
        connection.close()


STACK_PARAMS = [(d, t) for d in DATABASES for t in TRANSPORTS]
AMQP_STACKS = [(d, "amqp") for d in DATABASES]


def on_stacks(*pairs: tuple[str, str]) -> pytest.MarkDecorator:
    """Run a test over a subset of the matrix: ``@on_stacks(*AMQP_STACKS)``."""
    return pytest.mark.parametrize(
        "stack", list(pairs), indirect=True, ids=[f"{d}-{t}" for d, t in pairs]
    )


@contextmanager
def configured(config: Config, queue_sets: tuple[str, ...] = ()) -> Iterator[Config]:
    """Migrate and empty the database, make ``config`` the process default; afterwards
    restore the previous default and remove the broker objects and engines it made."""
    reset_database(config)
    previous = config_module._current
    config_module.configure(config)
    try:
        yield config
    finally:
        config_module._current = previous
        close_publishers()
        delete_broker_objects(config, queue_sets)
        dispose_engines()


@pytest.fixture(params=STACK_PARAMS, ids=lambda p: f"{p[0]}-{p[1]}")
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A configured, migrated, empty database and (for amqp) a private broker prefix."""
    database, transport = request.param
    config = make_config(database, transport, tmp_path)
    with configured(config, tuple(getattr(request, "queue_sets", ()))):
        yield Stack(database, transport, config)


@pytest.fixture
def sqlite_config(tmp_path: Path) -> Iterator[Config]:
    """SQLite + polling, configured as the process default: for fast unit tests."""
    with configured(make_config("sqlite", "polling", tmp_path)) as config:
        yield config


@pytest.fixture
def pg_amqp(tmp_path: Path) -> Iterator[Config]:
    """PostgreSQL + RabbitMQ, configured as the process default (e2e operations tests)."""
    with configured(make_config("postgresql", "amqp", tmp_path)) as config:
        yield config


def job_count(config: Config) -> int:
    with get_engine(config).connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM delayed_jobs")).scalar_one())


# --- helpers shared by integration and e2e tests ------------------------------------------


@pytest.fixture
def ledger_path(tmp_path: Path) -> str:
    """A fresh ledger file (see tests/ledger.py) for this test."""
    return str(tmp_path / "ledger.txt")


@contextmanager
def amqp_channel(config: Config) -> Iterator[object]:
    """A plain pika channel on the test broker."""
    assert config.amqp_url
    connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def declare_topology(config: Config, queue_sets: Sequence[str | None] = (None,)) -> None:
    """Declare the work exchange, the queue sets and the deferred queue (idempotent), so
    that a test can count messages in queues nobody has published to yet."""
    from tomqueue.topology import Topology
    from tomqueue.transport.amqp import declare_deferred, declare_work

    topology = Topology.of(config)
    with amqp_channel(config) as channel:
        for queue in queue_sets:
            declare_work(channel, topology, queue)
        declare_deferred(channel, topology)


def settle_enqueued() -> None:
    """Wait (bounded) until what this process enqueued is confirmed or given up:
    ``enqueue`` returns before its notification reaches the broker."""
    from tomqueue import flush

    flush(30)


def queue_depth(config: Config, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, by a passive declare (after
    ``settle_enqueued``)."""
    settle_enqueued()
    with amqp_channel(config) as channel:
        ok = channel.queue_declare(name, passive=True)  # type: ignore[attr-defined]
        return ok.method.message_count, ok.method.consumer_count


def drain_queue(config: Config, name: str) -> list[tuple[bytes, dict[str, object]]]:
    """Take (and ack) every ready message of a queue: [(body, headers)] (after
    ``settle_enqueued``)."""
    settle_enqueued()
    out: list[tuple[bytes, dict[str, object]]] = []
    with amqp_channel(config) as channel:
        while True:
            method, props, body = channel.basic_get(name, auto_ack=True)  # type: ignore
            if method is None:
                return out
            out.append((body, dict(props.headers or {})))


def publish_raw(
    config: Config,
    body: bytes,
    times: int = 1,
    headers: dict[str, object] | None = None,
    routing_key: str = "balance.normal",
) -> None:
    """Publish a raw body to ``<prefix>.work`` with pika (confirmed, mandatory)."""
    with amqp_channel(config) as channel:
        channel.confirm_delivery()  # type: ignore[attr-defined]
        for _ in range(times):
            channel.basic_publish(  # type: ignore[attr-defined]
                f"{config.prefix}.work",
                routing_key,
                body,
                pika.BasicProperties(
                    content_type="application/json", delivery_mode=2, headers=headers or {}
                ),
                mandatory=True,
            )


def run_threads(count: int, work: Callable[[int], None], timeout: float) -> list[BaseException]:
    """Run ``work(0) ... work(count - 1)`` in as many threads, started together behind a
    barrier; returns what they raised. Fails if a thread is still running after
    ``timeout`` seconds."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            barrier.wait(10)
            work(t)
        except BaseException as exc:  # returned to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout:g}s"
    return errors


def all_queue_names(config: Config, queue_sets: Sequence[str | None] = (None,)) -> list[str]:
    from tomqueue.topology import Topology

    topology = Topology.of(config)
    return [topology.queue_name(q, level) for q in queue_sets for level in LEVELS]


class WorkerThread:
    """An in-process ``Worker`` run in a background thread (so it installs no signal
    handlers in the test process). ``stop()`` asks it to finish; ``join()`` is bounded."""

    def __init__(self, config: Config, **kwargs: object) -> None:
        from tomqueue.worker.process import Worker

        kwargs.setdefault("imports", ["tests.jobs"])
        self.worker = Worker(config, **kwargs)  # type: ignore[arg-type]
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = self.worker.run()
        except BaseException as exc:  # reported by join()
            self.error = exc

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.worker.request_stop()

    def join(self, timeout: float) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop()
            self.thread.join(10)
            raise AssertionError(f"worker did not finish within {timeout:g}s")
        if self.error is not None:
            raise self.error
        assert self.exit_code is not None
        return self.exit_code

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.worker.ctx.counters)


def run_worker(config: Config, timeout: float = 30.0, **kwargs: object) -> WorkerThread:
    """Run an in-process worker with ``exit_on_complete`` until it exits (bounded). What
    this process enqueued is flushed first: ``exit_on_complete`` looks at the broker's
    queues, and ``enqueue`` returns before its notification is confirmed."""
    from tomqueue import flush

    assert flush(30), "notifications of enqueued jobs were not confirmed"
    kwargs.setdefault("exit_on_complete", True)
    worker = WorkerThread(config, **kwargs).start()
    code = worker.join(timeout)
    assert code == 0, f"worker exited with {code}"
    return worker


def worker_env(config: Config, **extra: str) -> dict[str, str]:
    """Environment for a ``tomqueue`` subprocess that uses the same database and prefix."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("TOMQUEUE_") and not key.startswith("TOMQUEUE_TEST_"):
            del env[key]
    env.update(
        TOMQUEUE_DATABASE_URL=config.database_url,
        TOMQUEUE_PREFIX=config.prefix,
        TOMQUEUE_SLEEP_DELAY=str(config.sleep_delay),
        TOMQUEUE_STOP_GRACE=str(config.stop_grace),
        TOMQUEUE_TIMEOUT_GRACE=str(config.timeout_grace),
        PYTHONUNBUFFERED="1",
    )
    if config.amqp_url:
        env["TOMQUEUE_AMQP_URL"] = config.amqp_url
    env.update(extra)
    return env


class WorkerProcess:
    """A real ``tomqueue worker`` subprocess in its own session (process group)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tomqueue", "worker", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def send_group(self, signum: int = signal.SIGINT) -> None:
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker pid {self.proc.pid} did not exit within {timeout:g}s; log:\n"
                + self.log()[-4000:]
            ) from None
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def worker_processes() -> Iterator[list[WorkerProcess]]:
    """Collects the worker subprocesses a test starts; kills leftovers at teardown."""
    started: list[WorkerProcess] = []
    yield started
    for proc in started:
        proc.kill()


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tomqueue ARGS`` in its own session; bounded by ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "tomqueue", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def wait_until(condition: object, timeout: float, what: str = "", interval: float = 0.05) -> object:
    from tests.ledger import wait_for

    return wait_for(condition, timeout, interval, what)  # type: ignore[arg-type]


def since(start: float) -> float:
    return time.monotonic() - start
