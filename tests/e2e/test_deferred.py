"""The deferred manager as a real process, with real workers, PostgreSQL and RabbitMQ.

Jobs are enqueued with ``Delayed.enqueue(..., run_at=...)``; ``tests.deferred_jobs.Timed``
records when each run starts (this host's clock, the one ``run_at`` was computed with), so a
test sees whether a job ran early, late, twice or never. The consumer_timeout scenarios run
against a second, private RabbitMQ node started by the test with ``consumer_timeout`` 5 s.
Every service is required: a missing one fails the test (never skips it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta
from pathlib import Path

import pika
import pytest

from tests import deferred_jobs
from tests.conftest import delete_broker_objects, make_config, reset_database
from tests.deferred_jobs import Timed, percentile
from tests.e2e.faults.broker import PrivateBroker
from tomqueue import Delayed
from tomqueue.config import Config
from tomqueue.db import dispose_engines
from tomqueue.topology import Topology
from tomqueue.transport import close_publishers, flush_publishers

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


# --- processes ----------------------------------------------------------------------------


class Proc:
    """A subprocess in its own process group, its output in a log file."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.log()}"
            return text in self.log()

        wait_for(seen, timeout, f"{text!r} in {self.log_path.name}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def env_for(config: Config, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOMQUEUE_")}
    env.update(
        TOMQUEUE_DATABASE_URL=config.database_url,
        TOMQUEUE_AMQP_URL=str(config.amqp_url),
        TOMQUEUE_PREFIX=config.prefix,
        TOMQUEUE_DEFERRED_STATS_INTERVAL="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Cluster:
    """Starts managers and workers for one test; kills whatever is left at teardown."""

    def __init__(self, config: Config, tmp_path: Path) -> None:
        self.config = config
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def manager(self, *args: str, entry: Sequence[str] = ("-m", "deferred")) -> Proc:
        name = f"manager{len(self.procs)}.log"
        proc = Proc([*entry, *args], env_for(self.config), self.tmp_path / name)
        self.procs.append(proc)
        proc.wait_log("holding the deliveries of")
        return proc

    def worker(self, threads: int = 4) -> Proc:
        argv = ["-m", "tomqueue", "worker", "--import", "tests.deferred_jobs"]
        name = f"worker{len(self.procs)}.log"
        proc = Proc([*argv, "--threads", str(threads)], env_for(self.config), self.tmp_path / name)
        self.procs.append(proc)
        proc.wait_log("consuming")
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.proc.poll() is None:
                proc.signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def make_stack(tmp_path: Path, amqp_url: str | None = None) -> Iterator[Config]:
    config = make_config("postgresql", "amqp", tmp_path)
    if amqp_url:
        config = config.replace(amqp_url=amqp_url)
    reset_database(config)
    try:
        yield config
    finally:
        close_publishers()
        delete_broker_objects(config)
        dispose_engines()


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    yield from make_stack(tmp_path)


@pytest.fixture
def cluster(config: Config, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(config, tmp_path)
    yield cluster
    cluster.close()


# --- jobs and the ledger -------------------------------------------------------------------


def enqueue(config: Config, ledger: Path, key: str, ahead: float, **kwargs: float) -> float:
    """Enqueue a ``Timed`` job ``ahead`` seconds from now; its run_at as a Unix time."""
    job = Delayed.enqueue(
        Timed(str(ledger), key, **kwargs), run_at=timedelta(seconds=ahead), config=config
    )
    return job.run_at.replace(tzinfo=UTC).timestamp()


def enqueue_many(config: Config, ledger: Path, ahead: Callable[[int], float], count: int) -> dict:
    """Enqueue ``count`` jobs from 4 threads; {key: run_at}."""
    with ThreadPoolExecutor(4) as pool:
        futures = {
            f"j{i}": pool.submit(enqueue, config, ledger, f"j{i}", ahead(i)) for i in range(count)
        }
    return {key: future.result() for key, future in futures.items()}


def wait_all_ran(ledger: Path, due: dict[str, float], timeout: float) -> list[float]:
    """Every job ran exactly once and none early; returns the lateness of each (seconds)."""
    wait_for(
        lambda: {s.key for s in deferred_jobs.starts(ledger)} >= set(due),
        timeout,
        f"{len(due)} jobs to run",
    )
    time.sleep(0.5)  # room for a duplicate to show up
    starts = deferred_jobs.starts(ledger)
    twice = [key for key, n in Counter(s.key for s in starts).items() if n > 1]
    assert not twice, f"ran more than once: {twice[:10]}"
    lateness = [s.when - due[s.key] for s in starts]
    early = [(s.key, round(s.when - due[s.key], 4)) for s in starts if s.when < due[s.key]]
    assert not early, f"ran before run_at: {early[:10]}"
    return lateness


def report(label: str, lateness: list[float]) -> tuple[float, float]:
    p50, p99 = percentile(lateness, 0.5), percentile(lateness, 0.99)
    print(
        f"\n{label}: {len(lateness)} jobs, lateness p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {max(lateness) * 1000:.1f} ms"
    )
    return p50, p99


def deferred_ready(config: Config) -> int:
    """Messages ready in the deferred queue, once every notification this process handed
    to its background publisher has reached the broker (``enqueue`` returns before that:
    an empty queue would otherwise not mean "all held by the manager")."""
    assert config.amqp_url
    assert flush_publishers(10), "this test's notifications were not confirmed within 10 s"
    connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    try:
        queue = Topology.of(config).deferred_queue
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def published_count(log: str) -> int:
    """``published N`` from the manager's last statistics line."""
    counts = re.findall(r"holding \d+ job\(s\).*?published (\d+)", log)
    return int(counts[-1]) if counts else 0


# --- scenarios on the shared broker ------------------------------------------------------


def test_future_jobs_run_on_time_and_never_early(
    config: Config, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.manager()
    cluster.worker()
    cluster.worker()
    ledger = tmp_path / "ledger"
    due = enqueue_many(config, ledger, lambda i: 2.0 + 2.0 * ((i * 7919) % 500) / 500, 500)
    lateness = wait_all_ran(ledger, due, timeout=30)
    _p50, p99 = report("500 jobs 2-4 s ahead", lateness)
    assert p99 < 0.2


def test_kill_9_while_holding_2000_jobs_then_restart(
    config: Config, cluster: Cluster, tmp_path: Path
) -> None:
    first = cluster.manager()
    ledger = tmp_path / "ledger"
    due = enqueue_many(config, ledger, lambda i: 10.0 + 2.0 * i / 2000, 2000)
    wait_for(lambda: deferred_ready(config) == 0, 10, "the manager to hold every job")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.wait(10)
    wait_for(lambda: deferred_ready(config) == 2000, 10, "the broker to requeue them")
    assert deferred_jobs.starts(ledger) == [], "nothing ran yet"
    cluster.manager()
    cluster.worker()
    cluster.worker()
    report("2,000 jobs after kill -9", wait_all_ran(ledger, due, timeout=40))


def test_two_managers_share_the_queue_and_every_job_runs_once(
    config: Config, cluster: Cluster, tmp_path: Path
) -> None:
    one = cluster.manager()
    two = cluster.manager(entry=("-m", "tomqueue", "deferred"))
    cluster.worker()
    cluster.worker()
    ledger = tmp_path / "ledger"
    due = enqueue_many(config, ledger, lambda i: 2.0 + i / 300, 300)
    report("two managers, 300 jobs", wait_all_ran(ledger, due, timeout=30))
    for proc in (one, two):
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    shares = [published_count(one.log()), published_count(two.log())]
    assert sum(shares) >= 300 and min(shares) > 0, shares


def held_now(proc: Proc) -> int:
    """``holding N`` from a manager's last statistics line (logged every second here)."""
    counts = re.findall(r"holding (\d+) job\(s\)", proc.log())
    return int(counts[-1]) if counts else 0


def test_two_managers_one_killed_loses_nothing_and_runs_nothing_twice(
    config: Config, cluster: Cluster, tmp_path: Path
) -> None:
    """Issue 3 requirement 4: several managers at once, one of them dies (kill -9) while
    holding its share: the broker requeues that share to the survivor, which releases it on
    time; every job runs exactly once and none early."""
    one = cluster.manager()
    two = cluster.manager()
    ledger = tmp_path / "ledger"
    due = enqueue_many(config, ledger, lambda i: 8.0 + 2.0 * i / 400, 400)
    wait_for(lambda: deferred_ready(config) == 0, 10, "the managers to hold every job")
    wait_for(
        lambda: held_now(one) + held_now(two) == 400 and min(held_now(one), held_now(two)) > 0,
        10,
        "both managers to hold a share of the 400 jobs",
    )
    lost_share = held_now(one)
    os.killpg(one.proc.pid, signal.SIGKILL)
    one.wait(10)
    assert deferred_jobs.starts(ledger) == [], "nothing ran yet"
    wait_for(lambda: held_now(two) == 400, 10, "the survivor to hold the killed one's share")
    cluster.worker()
    cluster.worker()
    report(
        f"two managers, one killed holding {lost_share} of 400",
        wait_all_ran(ledger, due, timeout=40),
    )
    assert two.proc.poll() is None
    assert published_count(one.log()) == 0, "the killed one released nothing before it died"
    wait_for(lambda: published_count(two.log()) == 400, 5, "the survivor to have published all")


def test_a_retry_travels_through_the_manager_at_its_backoff_time(
    config: Config, cluster: Cluster, tmp_path: Path
) -> None:
    manager = cluster.manager()
    cluster.worker()
    ledger = tmp_path / "ledger"
    for i in range(3):
        enqueue(config, ledger, f"r{i}", 0.0, fail_times=1, retry_in=2.0)
    wait_for(lambda: len(deferred_jobs.starts(ledger)) == 6, 15, "first runs and retries")
    lines = deferred_jobs.read(ledger)
    for key in ("r0", "r1", "r2"):
        runs = [x for x in lines if x.key == key and x.event == "start"]
        [resched] = [x for x in lines if x.key == key and x.event == "resched"]
        assert [r.attempts for r in runs] == [0, 1]
        assert resched.when - runs[0].when == pytest.approx(2.0, abs=0.3)
        assert 0 <= runs[1].when - resched.when < 0.5, "the retry ran early or late"
    time.sleep(1.2)
    assert published_count(manager.log()) >= 3


def test_a_malformed_message_is_dropped_and_the_manager_keeps_running(
    config: Config, cluster: Cluster, tmp_path: Path
) -> None:
    manager = cluster.manager()
    cluster.worker()
    assert config.amqp_url
    connection = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    for body in (b"garbage \x00\xff", json.dumps({"delayed_job_id": "x"}).encode()):
        channel.basic_publish(Topology.of(config).deferred_exchange, "", body, mandatory=True)
    connection.close()
    ledger = tmp_path / "ledger"
    due = {"ok": enqueue(config, ledger, "ok", 1.0)}
    wait_all_ran(ledger, due, timeout=10)
    assert manager.log().count("dropping a malformed message") == 2
    assert "garbage" in manager.log() and manager.proc.poll() is None
    wait_for(lambda: deferred_ready(config) == 0, 5, "an empty deferred queue")


def test_term_exits_0_promptly_and_returns_held_jobs_to_the_queue(
    config: Config, cluster: Cluster, tmp_path: Path
) -> None:
    manager = cluster.manager()
    ledger = tmp_path / "ledger"
    enqueue_many(config, ledger, lambda i: 60.0 + i / 100, 200)
    wait_for(lambda: deferred_ready(config) == 0, 10, "the manager to hold every job")
    started = time.monotonic()
    manager.signal(signal.SIGTERM)
    assert manager.wait(5) == 0
    took = time.monotonic() - started
    wait_for(lambda: deferred_ready(config) == 200, 5, "the held jobs back in the queue")
    print(f"\nTERM with 200 held: exited 0 after {took * 1000:.0f} ms")
    assert took < 2.0
    assert "released 200 held job(s)" in manager.log()


# --- consumer_timeout: a private broker node -----------------------------------------------


FAST_TIMEOUT = "[{rabbit,[{consumer_timeout,5000},{channel_tick_interval,1000}]}].\n"


@pytest.fixture(scope="module")
def fast_timeout_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    """A RabbitMQ node of its own (ports, data, config) with consumer_timeout 5 s."""
    node = PrivateBroker(tmp_path_factory.mktemp("rabbit"), FAST_TIMEOUT, "tqdeferred")
    try:
        node.start()
        assert "{ok,5000}" in node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
        yield node
    finally:
        node.stop()


@pytest.fixture
def node_config(fast_timeout_node: PrivateBroker, tmp_path: Path) -> Iterator[Config]:
    yield from make_stack(tmp_path, fast_timeout_node.url)


def test_refreshes_keep_deliveries_under_consumer_timeout(
    fast_timeout_node: PrivateBroker, node_config: Config, tmp_path: Path
) -> None:
    cluster = Cluster(node_config, tmp_path)
    try:
        timeouts_before = fast_timeout_node.timeouts_logged()
        manager = cluster.manager("--refresh-interval", "2")
        cluster.worker()
        ledger = tmp_path / "ledger"
        due = enqueue_many(node_config, ledger, lambda i: 15.0 + i / 30, 30)
        report("held 3x consumer_timeout", wait_all_ran(ledger, due, timeout=30))
        log = manager.log()
        assert "reconnecting" not in log and "PRECONDITION" not in log, log[-3000:]
        assert fast_timeout_node.timeouts_logged() == timeouts_before
        refreshed = re.findall(r"refreshed (\d+)", log)
        assert refreshed and int(refreshed[-1]) >= 30 * 5, "held deliveries were refreshed"
    finally:
        cluster.close()


def test_without_refresh_the_broker_closes_the_channel_and_the_manager_recovers(
    fast_timeout_node: PrivateBroker, node_config: Config, tmp_path: Path
) -> None:
    cluster = Cluster(node_config, tmp_path)
    try:
        manager = cluster.manager("--refresh-interval", "60")
        cluster.worker()
        ledger = tmp_path / "ledger"
        due = {f"k{i}": enqueue(node_config, ledger, f"k{i}", 9.0) for i in range(5)}
        manager.wait_log("PRECONDITION_FAILED", timeout=12)
        manager.wait_log("reconnecting", timeout=5)
        report("after a 406 channel close", wait_all_ran(ledger, due, timeout=15))
        assert manager.proc.poll() is None
    finally:
        cluster.close()


def test_a_broker_restart_loses_no_held_job(
    fast_timeout_node: PrivateBroker, node_config: Config, tmp_path: Path
) -> None:
    cluster = Cluster(node_config, tmp_path)
    try:
        manager = cluster.manager("--refresh-interval", "2")
        cluster.worker()
        ledger = tmp_path / "ledger"
        due = enqueue_many(node_config, ledger, lambda i: 10.0 + i / 20, 20)
        close_publishers()
        wait_for(lambda: deferred_ready(node_config) == 0, 5, "the manager to hold them")
        fast_timeout_node.ctl("stop_app")
        time.sleep(1.0)
        fast_timeout_node.ctl("start_app")
        manager.wait_log("reconnecting", timeout=10)
        report("across a broker restart", wait_all_ran(ledger, due, timeout=30))
        assert manager.proc.poll() is None
    finally:
        cluster.close()


def test_a_job_longer_than_consumer_timeout_does_not_hold_its_delivery(
    fast_timeout_node: PrivateBroker, node_config: Config, tmp_path: Path
) -> None:
    """Principle 3 on the worker's side (issue 2, pop/ack): a job that runs three times the
    broker's consumer_timeout has its delivery acked early (``delivery_hold_limit``, 2 s
    here), so the broker never closes the worker's channel (with a hold limit of 300 s it
    does: the node logs a consumer_timeout) and the job runs once."""
    from tests import ledger as record_ledger
    from tests.jobs import Sleepy

    timeouts_before = fast_timeout_node.timeouts_logged()
    ledger = tmp_path / "ledger"
    worker = Proc(
        ["-m", "tomqueue", "worker", "--import", "tests.jobs"],
        env_for(node_config, TOMQUEUE_DELIVERY_HOLD_LIMIT="2"),
        tmp_path / "worker.log",
    )
    try:
        worker.wait_log("consuming")
        Delayed.enqueue(Sleepy(str(ledger), "long", 15.0), config=node_config)
        wait_for(lambda: record_ledger.counts(ledger)["long"] == 1, 40, "the long job to end")
        time.sleep(1.5)  # a redelivery would show up by now
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        worker.kill()
    log = worker.log()
    assert record_ledger.counts(ledger, "start") == {"long": 1}
    assert "broker connection lost" not in log and "PRECONDITION" not in log, log[-3000:]
    assert fast_timeout_node.timeouts_logged() == timeouts_before
