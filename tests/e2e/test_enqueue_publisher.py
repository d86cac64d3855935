"""The background publisher of ``enqueue`` against broker faults and process exit.

- Our own enqueue connection closed by the broker (by its connection name and pid — never
  anyone else's on the shared broker) while jobs are being enqueued: every notification
  still arrives, at least once.
- The broker unreachable (a closed port): ``enqueue`` still commits and returns at once,
  the notifications are given up with an ERROR naming each job, and workers (on the real
  broker) get the jobs from the sweeper.
- A process that enqueues and exits at once: the interpreter's exit flushes, and the
  notifications are in the queue.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fault_jobs
from tests.conftest import (
    declare_topology,
    delete_broker_objects,
    drain_queue,
    make_config,
    reset_database,
    wait_until,
)
from tests.e2e.faults import broker as brokerctl
from tests.e2e.faults.cluster import SWEEP, Cluster, assert_settled
from tests.jobs import Record
from tests.ports import free_port
from tomqueue import enqueue, flush
from tomqueue.config import Config
from tomqueue.db import dispose_engines
from tomqueue.message import decode
from tomqueue.transport import close_publishers


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """PostgreSQL and the shared broker under a private prefix, with fault-suite timings
    (the sweeper looks every second for jobs not notified for 2 s)."""
    config = make_config("postgresql", "amqp", tmp_path)
    reset_database(config)
    made = Cluster(config, tmp_path)
    try:
        yield made
    finally:
        made.close()
        close_publishers()
        delete_broker_objects(config)
        dispose_engines()


def committed(log: str) -> dict[str, int]:
    """``{marker: job id}`` from the ``committed <id> <marker>`` lines of an enqueuer."""
    found = {}
    for line in log.splitlines():
        if line.startswith("committed "):
            _, job_id, marker = line.split()
            found[marker] = int(job_id)
    return found


def test_own_connection_closed_twice_while_enqueuing_loses_nothing(
    pg_amqp: Config, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = pg_amqp
    declare_topology(config)
    ids: list[int] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(3000):
                ids.append(enqueue(Record(ledger_path, f"j{i}")).id)
                time.sleep(0.002)  # about 400/s: the closes land in the middle of it
        except BaseException as exc:  # reported below
            errors.append(exc)

    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    for target in (400, 1400):
        wait_until(lambda t=target: len(ids) >= t, 60, f"{target} enqueues")  # type: ignore[misc]
        wait_until(
            lambda: brokerctl.close_connections([os.getpid()], roles=["enqueue"]) >= 1,
            30,
            "our enqueue connection to be closed",
        )
    producer.join(120)
    assert not producer.is_alive() and not errors, errors
    assert flush(60) is True
    queue = f"{config.prefix}.balance.normal"
    seen = Counter(decode(b, h).job_id for b, h in drain_queue(config, queue))
    missing = set(ids) - set(seen)
    assert not missing, f"{len(missing)} notification(s) never arrived: {sorted(missing)[:10]}"
    assert set(seen) == set(ids)
    lost = [r for r in caplog.records if getattr(r, "action", None) == "publish_reconnect"]
    assert len(lost) >= 2, "the publisher should have seen both closes"
    duplicates = sum(n - 1 for n in seen.values())
    print(f"\n3,000 enqueues across 2 closed connections: {duplicates} duplicate(s)")


@pytest.mark.parametrize("retry_for", ["0.5", "default"])
def test_unreachable_broker_enqueue_commits_logs_and_the_sweeper_delivers(
    cluster: Cluster, ledger_path: str, retry_for: str
) -> None:
    """With the default ``publish_retry_for`` (30 s) the exit's flush (5 s) gives up."""
    cluster.workers(2)
    env = cluster.env(TOMQUEUE_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    if retry_for != "default":
        env["TOMQUEUE_PUBLISH_RETRY_FOR"] = retry_for
    started = time.monotonic()
    enqueuer = cluster.process(
        "enqueue", ["-m", "tests.fault_jobs", "enqueue", ledger_path, "u", "3"], env
    )
    assert enqueuer.wait(30) == 0, enqueuer.log()
    took = time.monotonic() - started
    log = enqueuer.log()
    assert len(committed(log)) == 3, log[-3000:]  # rows: the sweeper may have run them already
    failed = [line for line in log.splitlines() if "was not confirmed" in line]
    assert len(failed) == 3, log[-3000:]
    assert {str(i) for i in committed(log).values()} == {line.split()[1] for line in failed}
    markers = ["u0", "u1", "u2"]
    wait_until(lambda: set(markers) <= fault_jobs.completed(ledger_path), SWEEP + 10, "the sweeper")
    print(f"\nunreachable broker (retry {retry_for}): enqueuer exited after {took:.1f}s")
    fault_jobs.check(ledger_path, markers).assert_ok()
    assert_settled(cluster.config)


def test_a_process_that_exits_right_after_enqueue_flushes_at_exit(
    cluster: Cluster, ledger_path: str
) -> None:
    declare_topology(cluster.config)
    enqueuer = cluster.process(
        "enqueue", ["-m", "tests.fault_jobs", "enqueue", ledger_path, "x", "3"], cluster.env()
    )
    assert enqueuer.wait(30) == 0, enqueuer.log()
    ids = sorted(committed(enqueuer.log()).values())
    assert len(ids) == 3, enqueuer.log()
    queue = f"{cluster.config.prefix}.balance.normal"
    assert sorted(decode(b, h).job_id for b, h in drain_queue(cluster.config, queue)) == ids
    assert "not confirmed" not in enqueuer.log()
