"""Must-show 1: 1,000 jobs at mixed priorities, enqueued from 4 threads, worked by
``tomqueue worker -n 2 --threads 4``: every job performed exactly once, no row left in
``delayed_jobs``, every broker queue empty. PostgreSQL+AMQP and MariaDB+AMQP.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

from sqlalchemy import text

import tomqueue
from tests import ledger
from tests.conftest import (
    Stack,
    WorkerProcess,
    all_queue_names,
    declare_topology,
    job_count,
    on_stacks,
    queue_depth,
    wait_until,
    worker_env,
)
from tests.jobs import Record
from tomqueue.db import get_engine

JOBS = 1000


def registered_workers(config: tomqueue.Config) -> int:
    """Live worker processes in the registry (they register before taking any job)."""
    with get_engine(config).connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM tomqueue_workers")).scalar_one())


ENQUEUE_THREADS = 4
PRIORITIES = (-10, -5, -1, 0, 0, 1, 3, 5, 10)  # every level, plus an unmapped one


@on_stacks(
    ("postgresql", "amqp"), ("mysql", "amqp"), ("postgresql", "polling"), ("sqlite", "polling")
)
def test_thousand_jobs_two_processes_exactly_once(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    config = stack.config
    if stack.transport == "amqp":
        declare_topology(config)
    worker = WorkerProcess(
        ["-n", "2", "--threads", "4", "--import", "tests.jobs"],
        worker_env(config),
        tmp_path / "worker.log",
    )
    worker_processes.append(worker)
    wait_until(lambda: registered_workers(config) == 2, 30, "2 worker processes registered")
    if stack.transport == "amqp":
        normal = f"{config.prefix}.balance.normal"
        wait_until(lambda: queue_depth(config, normal)[1] == 2, 30, "2 processes consuming")

    errors: list[BaseException] = []

    def produce(t: int) -> None:
        try:
            for i in range(t, JOBS, ENQUEUE_THREADS):
                tomqueue.enqueue(
                    Record(ledger_path, f"j{i}"), priority=PRIORITIES[i % len(PRIORITIES)]
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    started = time.monotonic()
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(ENQUEUE_THREADS)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join(60)
    assert not errors, errors

    def all_done() -> bool:
        return len(ledger.read(ledger_path)) >= JOBS and job_count(config) == 0

    wait_until(all_done, 60, f"{JOBS} jobs performed", interval=0.2)
    elapsed = time.monotonic() - started

    worker.send(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()[-3000:]

    entries = ledger.read(ledger_path)
    counts = ledger.counts(ledger_path)
    assert len(counts) == JOBS, "some jobs never ran"
    duplicates = {m: c for m, c in counts.items() if c != 1}
    assert not duplicates, f"performed more than once: {duplicates}"
    assert set(counts) == {f"j{i}" for i in range(JOBS)}
    assert job_count(config) == 0
    assert len({e.pid for e in entries}) == 2, "both worker processes should have worked"
    if stack.transport == "amqp":
        for name in [*all_queue_names(config), f"{config.prefix}.work.deferred"]:
            assert queue_depth(config, name) == (0, 0), f"{name} not empty after the run"
    log = worker.log()
    assert "Traceback" not in log, log[-3000:]
    assert not re.search(r"internal_error|worker error", log)
    print(f"{JOBS} jobs in {elapsed:.1f}s on {stack.id}")
