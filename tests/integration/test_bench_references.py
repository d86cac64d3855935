"""``bench.references.run_w1``, the W1 runner of the Celery and Dramatiq reference points,
driven by a plain pika worker (``tests/ref_fake_worker.py``): the same code path without
either library installed (CI installs ``.[dev]`` only, and skipped tests fail CI).

What the libraries add on top (their app modules and worker command lines) runs in
``python -m bench`` on a machine with ``pip install -e '.[dev,bench]'``.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest

from bench import references
from bench.env import Target
from tests.conftest import AMQP_URL, POSTGRES_URL

pytestmark = pytest.mark.amqp


class FakeReference(references.Reference):
    """Publishes with pika to the default exchange; the worker is ``tests.ref_fake_worker``."""

    name = "fake"
    label = "Fake"

    def __init__(self, mode: str = "normal") -> None:
        self.mode = mode

    def available(self) -> bool:
        return True

    def version(self) -> str:
        return "0.0"

    def settings(self, threads: int) -> dict[str, Any]:
        return {"mode": self.mode, "threads": threads}

    def producer(self, url: str, queue: str) -> references.Producer:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)

        def send() -> None:
            channel.basic_publish("", queue, b"{}")

        return send, connection.close

    def worker_argv(self, threads: int, queue: str) -> list[str]:
        return [sys.executable, "-m", "tests.ref_fake_worker", self.mode, str(threads)]


@pytest.fixture
def target(tmp_path: Path) -> Target:
    return Target("postgresql", POSTGRES_URL, AMQP_URL, f"brf{uuid.uuid4().hex[:8]}", tmp_path)


def queue_exists(target: Target, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers signal 0: it is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_w1_counts_every_job_and_deletes_the_queue(target: Target) -> None:
    result = references.run_w1(FakeReference(), target, 300, 2)

    assert result["jobs"] == 300 and result["threads"] == 2
    assert result["enqueue_per_s"] > 0 and result["enqueue_seconds"] > 0
    assert result["processed_per_s"] > 0
    assert 0 < result["first_job_after_s"] <= result["drain_seconds"]
    assert result["processed_per_s"] == pytest.approx(300 / result["drain_seconds"])
    assert result["duplicates"] == 0
    assert result["left_ready"] == 0 and result["requeued_after_stop"] == 0
    assert result["stopped_gracefully"] is True
    assert result["peak_rss_mb"] > 0
    assert result["settings"] == {"mode": "normal", "threads": 2}
    assert result["queue"] == f"{target.prefix}.ref.fake"
    assert not queue_exists(target, result["queue"])


def test_a_worker_that_dies_early_is_an_error_not_a_hang(target: Target) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited \(code 3\) after 50 of 200 jobs"):
        references.run_w1(FakeReference("exit-after-50"), target, 200, 1, timeout=60)
    assert time.monotonic() - started < 30
    assert not queue_exists(target, f"{target.prefix}.ref.fake")


@pytest.mark.parametrize(("mode", "graceful"), [("stubborn", False), ("leaves-child", True)])
def test_the_workers_process_group_is_killed(
    target: Target, monkeypatch: pytest.MonkeyPatch, mode: str, graceful: bool
) -> None:
    """A worker that ignores SIGTERM is killed after STOP_TIMEOUT; a child left behind by a
    worker that did exit dies with its process group."""
    monkeypatch.setattr(references, "STOP_TIMEOUT", 1.0)
    started = time.monotonic()
    result = references.run_w1(FakeReference(mode), target, 100, 1)
    assert time.monotonic() - started < 30
    assert result["stopped_gracefully"] is graceful
    assert result["duplicates"] == 0
    child = int(Path(f"{target.workdir}/postgresql-ref-fake-w1.ledger.child").read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the worker's child outlived the kill of its process group"
    assert not queue_exists(target, result["queue"])
