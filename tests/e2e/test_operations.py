"""What an operator sees: the RabbitMQ management UI (through its HTTP API) and the
Prometheus metrics of a worker and of the deferred manager."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import ledger
from tests.conftest import (
    REPO_ROOT,
    WorkerProcess,
    worker_env,
)
from tests.jobs import Boom, Record
from tests.ports import free_port
from tomqueue import enqueue, flush
from tomqueue.config import Config

API = "http://127.0.0.1:15672/api"
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def api(path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"{API}/{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": AUTH, "content-type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _api_up() -> bool:
    try:
        return bool(api("overview"))
    except OSError:
        return False


@pytest.fixture(scope="module")
def management() -> None:
    """Enable the management plugin if it is not (idempotent) and wait for its API."""
    if not _api_up():
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    ledger.wait_for(_api_up, 60, 0.5, "the RabbitMQ management API on :15672")


def queue(config: Config, name: str) -> Any:
    return api(f"queues/%2F/{urllib.parse.quote(name, safe='')}")


def test_management_ui_shows_named_durable_queues_and_readable_messages(
    management: None, pg_amqp: Config, ledger_path: str
) -> None:
    job = enqueue(Record(ledger_path, "ui"), priority=-1)
    assert flush(30), "the notification was not confirmed"  # enqueue returns before that
    prefix = pg_amqp.prefix
    work = api(f"exchanges/%2F/{urllib.parse.quote(prefix + '.work', safe='')}")
    assert work["type"] == "topic" and work["durable"]
    deferred = api(f"exchanges/%2F/{urllib.parse.quote(prefix + '.work.deferred', safe='')}")
    assert deferred["type"] == "fanout"
    for level in ("high", "normal", "low", "bulk"):
        info = queue(pg_amqp, f"{prefix}.balance.{level}")
        assert info["durable"] and info["arguments"].get("x-queue-type") == "classic"
    ledger.wait_for(
        lambda: queue(pg_amqp, f"{prefix}.balance.high").get("messages_ready") == 1,
        20,
        0.5,
        "the management API to count the message",
    )
    [message] = api(
        f"queues/%2F/{urllib.parse.quote(prefix + '.balance.high', safe='')}/get",
        {"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"},
    )
    props = message["properties"]
    assert props["content_type"] == "application/json"
    assert props["delivery_mode"] == 2
    assert props["headers"]["job_id"] == job.id
    assert props["headers"]["job_class"] == "tests.jobs:Record"
    assert props["headers"]["priority_level"] == "high"
    body = json.loads(message["payload"])
    assert body["delayed_job_id"] == job.id and body["delayed_job_digest"] == "1"


def test_deferred_queue_unacked_count_equals_what_the_manager_holds(
    management: None, pg_amqp: Config, ledger_path: str
) -> None:
    from tests.integration.test_deferred import Running

    for i in range(25):
        enqueue(Record(ledger_path, f"later{i}"), run_at=timedelta(minutes=10))
    running = Running(pg_amqp)
    try:
        running.wait_holding(25)
        name = f"{pg_amqp.prefix}.work.deferred"
        ledger.wait_for(
            lambda: queue(pg_amqp, name).get("messages_unacknowledged") == 25,
            30,
            0.5,
            "the management API to show the manager's 25 held messages as unacked",
        )
        assert running.manager.held_count() == 25
        ledger.wait_for(
            lambda: queue(pg_amqp, name).get("consumers") == 1,
            30,
            0.5,
            "the management API to show the manager as the one consumer",
        )
    finally:
        running.stop()


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_worker_and_deferred_metrics_count_what_ran(
    pg_amqp: Config, ledger_path: str, tmp_path: Path
) -> None:
    port, deferred_port = free_port(), free_port()
    for i in range(7):
        enqueue(Record(ledger_path, f"m{i}"))
    for i in range(2):
        enqueue(Boom(ledger_path, f"b{i}"))
    for i in range(3):
        enqueue(Record(ledger_path, f"later{i}"), run_at=timedelta(minutes=10))
    worker = WorkerProcess(
        ["--import", "tests.jobs", "--threads", "2", "--metrics-port", str(port)],
        worker_env(pg_amqp),
        tmp_path / "worker.log",
    )
    manager = subprocess.Popen(
        [sys.executable, "-m", "deferred", "--metrics-port", str(deferred_port)],
        cwd=REPO_ROOT,
        env=worker_env(pg_amqp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        succeeded = 'tomqueue_jobs_total{outcome="succeeded",queue="balance"}'
        retried = 'tomqueue_jobs_total{outcome="retry",queue="balance"}'

        def counted() -> bool:
            try:
                got = _scrape(port)
            except OSError:
                return False
            return got.get(succeeded) == 7 and got.get(retried) == 2

        ledger.wait_for(counted, 30, 0.2, "the worker's metrics to count 7 + 2 jobs")
        got = _scrape(port)
        assert got['tomqueue_job_run_seconds_count{queue="balance"}'] == 9
        assert got['tomqueue_job_wait_seconds_count{queue="balance"}'] == 9

        def held() -> bool:
            try:
                return _scrape(deferred_port).get("tomqueue_deferred_held") == 5  # 3 + 2 retries
            except OSError:
                return False

        ledger.wait_for(held, 30, 0.2, "the manager's held gauge to show 5")
    finally:
        worker.send()
        manager.terminate()
        assert worker.wait(30) == 0
        assert manager.wait(30) == 0


def _scrape_or_empty(port: int) -> dict[str, float]:
    try:
        return _scrape(port)
    except OSError:  # not serving yet
        return {}


def test_deferred_reconnects_counter_counts_closed_connections(
    pg_amqp: Config, ledger_path: str, tmp_path: Path
) -> None:
    """The broker closes the manager's connection (by its name, as an operator would in the
    management UI): ``tomqueue_reconnects_total{role="deferred"}`` counts each, and the
    held gauge comes back to what is held, not doubled."""
    from tests.e2e.faults.broker import close_connections

    port = free_port()
    reconnects = 'tomqueue_reconnects_total{role="deferred"}'
    for i in range(3):
        enqueue(Record(ledger_path, f"later{i}"), run_at=timedelta(minutes=10))
    with open(tmp_path / "deferred.log", "wb") as log:
        manager = subprocess.Popen(
            [sys.executable, "-m", "tomqueue", "deferred", "--metrics-port", str(port)],
            cwd=REPO_ROOT,
            env=worker_env(pg_amqp),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        held = "tomqueue_deferred_held"
        ledger.wait_for(lambda: _scrape_or_empty(port).get(held) == 3, 30, 0.2, "3 held")
        assert _scrape(port).get(reconnects, 0) == 0
        for n in (1, 2):
            ledger.wait_for(
                lambda: close_connections([manager.pid], roles=("deferred",)) == 1,
                10,
                0.5,
                "the manager's connection to close",
            )
            ledger.wait_for(
                lambda n=n: _scrape(port).get(reconnects) == n, 30, 0.2, f"{n} reconnect(s)"
            )
            ledger.wait_for(lambda: _scrape(port).get(held) == 3, 30, 0.2, "3 held again")
    finally:
        manager.terminate()
        assert manager.wait(30) == 0
    assert (tmp_path / "deferred.log").read_text().count("reconnecting") == 2


def test_the_sweeping_worker_reports_queue_lag(
    pg_amqp: Config, ledger_path: str, tmp_path: Path
) -> None:
    """A job in a queue no worker consumes waits; the worker holding the sweeper lease
    reports its age as ``tomqueue_queue_lag_seconds``."""
    port = free_port()
    enqueue(Record(ledger_path, "waiting"), queue="mail", priority=-1)
    worker = WorkerProcess(
        ["--import", "tests.jobs", "--metrics-port", str(port)],
        worker_env(pg_amqp, TOMQUEUE_SWEEP_INTERVAL="0.5"),
        tmp_path / "worker.log",
    )
    lag = 'tomqueue_queue_lag_seconds{level="high",queue="mail"}'
    try:
        ledger.wait_for(lambda: _scrape_or_empty(port).get(lag, 0) > 0, 30, 0.2, "a lag")
        first = _scrape(port)[lag]
        ledger.wait_for(lambda: _scrape(port)[lag] >= first + 1, 10, 0.2, "the lag to grow")
    finally:
        worker.send()
        assert worker.wait(30) == 0
