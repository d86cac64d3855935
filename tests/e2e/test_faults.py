"""Issue 4: fault injection against the real thing.

Real PostgreSQL, MariaDB and RabbitMQ; real ``tomqueue worker`` and ``tomqueue deferred``
processes with short timings (heartbeat 0.5 s, lease 3 s, sweep every 1 s for jobs not
notified for 2 s, stop grace 2 s: ``faults/cluster.py``). Every job is a
``tests.fault_jobs.LedgerJob``: each run appends its start and end (pid, run id, time) to a
ledger, so each scenario ends with the same check: every job completed the expected number
of times, no two runs of one job overlapped in time, and nothing is left locked or
unnotified in ``delayed_jobs`` (only the expected failed rows) nor waiting in a work queue.

What the design guarantees, and so what is asserted:
- **No overlap, ever**: the database row is the only lock, fenced; a worker stops a job
  before its lease can expire.
- **Nothing lost**: whatever dies, a committed job runs (or ends failed).
- **Exactly once** while the database keeps every worker's lock: broker faults (closed
  connections, a broker restart, a silent broker partition), publish failures, a killed
  deferred manager, a worker killed *after* recording the outcome. The delete of the row is
  the commit point; a redelivery finds it missing.
- **At least once** when a worker loses its lock: killed mid-job, stopped past its grace,
  cut from the database for longer than its lease. The interrupted run is repeated; the
  runs never overlap.

Faults touch only what the test owns: its own database (``TOMQUEUE_TEST_*_URL``), its own
broker prefix, its own processes' broker connections (closed by connection name), a
private RabbitMQ node for whole-node faults (``close_all_connections``, ``stop_app``, disk
alarm, short ``consumer_timeout``), and private PostgreSQL / MariaDB servers for database
restarts and crashes (``faults/dbservers.py``). ``@pytest.mark.slow`` (deselected by
default, ``pytest -m slow``): the long restart series.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta
from pathlib import Path

import psutil
import pytest

from tests import fault_jobs
from tests.conftest import (
    delete_broker_objects,
    make_config,
    queue_depth,
    reset_database,
    wait_until,
)
from tests.e2e.faults import broker as brokerctl
from tests.e2e.faults import dbctl, dbservers
from tests.e2e.faults.cluster import (
    FAST,
    LEASE,
    SWEEP,
    Cluster,
    assert_settled,
    describe,
    row,
    rows,
)
from tests.e2e.faults.proxy import TcpProxy
from tests.fault_jobs import AbortJob, BlockingJob, LedgerJob
from tomqueue import Delayed
from tomqueue.db import dispose_engines, get_engine
from tomqueue.schema import Job
from tomqueue.topology import Topology
from tomqueue.transport import close_publishers

STOP_GRACE = float(FAST["TOMQUEUE_STOP_GRACE"])
TAKEOVER = LEASE + SWEEP + 2.0  # a dead worker's job is running elsewhere within this


# --- fixtures and helpers ---------------------------------------------------------------------

MakeCluster = Callable[..., Cluster]


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[MakeCluster]:
    """``clusters(database, amqp_url=None, database_url=None, **env)``: a migrated, empty
    database (the test database of that engine, or ``database_url``: a private server) with
    a private broker prefix, and a Cluster of processes; everything is stopped and removed
    at teardown."""
    made: list[Cluster] = []

    def make(
        database: str = "postgresql",
        amqp_url: str | None = None,
        database_url: str | None = None,
        **env: str,
    ) -> Cluster:
        overrides = {"amqp_url": amqp_url} if amqp_url else {}
        if database_url:
            overrides["database_url"] = database_url
        config = make_config(database, "amqp", tmp_path, **overrides)
        reset_database(config)
        cluster = Cluster(config, tmp_path, **env)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
    close_publishers()
    for cluster in made:
        with contextlib.suppress(Exception):  # a private node already gone: nothing to delete
            delete_broker_objects(cluster.config)
    dispose_engines()


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[brokerctl.PrivateBroker]:
    node = brokerctl.PrivateBroker(tmp_path_factory.mktemp("rabbit"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


def enqueue(cluster: Cluster, ledger: str, marker: str, seconds: float = 0.0, **kw: object) -> Job:
    return Delayed.enqueue(LedgerJob(ledger, marker, seconds), config=cluster.config, **kw)


def enqueue_many(
    cluster: Cluster, ledger: str, markers: list[str], seconds: float = 0.0, threads: int = 4
) -> list[Job]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda m: enqueue(cluster, ledger, m, seconds), markers))


class Producer(threading.Thread):
    """Enqueues markers in the background at about ``rate`` per second. ``tolerant``: an
    enqueue that raises (database down) is counted in ``refused`` and the producer goes on;
    otherwise the first error stops it."""

    def __init__(
        self,
        cluster: Cluster,
        ledger: str,
        markers: list[str],
        rate: float,
        tolerant: bool = False,
    ) -> None:
        super().__init__(name="producer", daemon=True)
        self.cluster, self.ledger, self.markers, self.rate = cluster, ledger, markers, rate
        self.tolerant = tolerant
        self.errors: list[BaseException] = []
        self.committed: list[str] = []
        self.refused: list[str] = []

    @property
    def enqueued(self) -> int:
        return len(self.committed)

    @property
    def attempted(self) -> int:
        return len(self.committed) + len(self.refused)

    def run(self) -> None:
        started = time.monotonic()
        for i, marker in enumerate(self.markers):
            pause = started + i / self.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                enqueue(self.cluster, self.ledger, marker)
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                self.refused.append(marker)
                if not self.tolerant:
                    return
                continue
            self.committed.append(marker)


def wait_completed(ledger: str, markers: list[str] | set[str], timeout: float, c: Cluster) -> None:
    wanted = set(markers)

    def done() -> bool:
        return wanted <= fault_jobs.completed(ledger)

    try:
        wait_until(done, timeout, f"{len(wanted)} job(s) to complete", interval=0.1)
    except AssertionError:
        missing = sorted(wanted - fault_jobs.completed(ledger))
        raise AssertionError(
            f"{len(missing)} job(s) never completed within {timeout:g}s: {missing[:10]}\n"
            + "\n".join(describe(r) for r in rows(c.config)[:10])
            + "\n"
            + c.logs()
        ) from None


def completed_count(ledger: str) -> int:
    return len(fault_jobs.completed(ledger))


def pids_of(cluster: Cluster) -> list[int]:
    return [p.pid for p in cluster.procs if p.alive()]


def log_lines(text: str, needle: str) -> int:
    return sum(1 for line in text.splitlines() if needle in line)


# --- 1. a worker killed (-9) mid-job ----------------------------------------------------------


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_kill9_mid_job_runs_again_elsewhere_after_the_lease(
    clusters: MakeCluster, database: str, ledger_path: str
) -> None:
    c = clusters(database)
    c.deferred()
    first_worker, second_worker = c.workers(2)
    job = enqueue(c, ledger_path, "mid", seconds=2.0)
    wait_until(lambda: fault_jobs.runs_of(ledger_path, "mid"), 15, "the job to start")
    [first] = fault_jobs.runs_of(ledger_path, "mid")
    victim, survivor = (
        (first_worker, second_worker)
        if first.pid == first_worker.pid
        else (second_worker, first_worker)
    )
    assert first.pid == victim.pid

    died = victim.kill9()
    wait_completed(ledger_path, ["mid"], TAKEOVER + 2.0 + 5.0, c)

    fault_jobs.check(ledger_path, [], {"mid": 2}, c.deaths).assert_ok()
    killed, rerun = fault_jobs.runs_of(ledger_path, "mid")
    assert killed.end is None and rerun.status == "ok" and rerun.pid == survivor.pid
    assert (rerun.attempts, rerun.crashes) == (1, 1), "the crash counts as an attempt"
    waited = rerun.start - died
    print(f"\n{database}: killed mid-job, run again elsewhere after {waited:.2f}s")
    assert LEASE - 1.0 < waited < TAKEOVER, "taken over before the lease expired, or late"
    assert_settled(c.config)  # waits for the rerun's outcome: the ledger's end line comes first
    assert row(c.config, job.id) is None


# --- 2. a worker killed (-9) after recording, before the ack ----------------------------------


def test_kill9_after_record_before_ack_never_runs_twice(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql")
    dying = c.worker(env={"TOMQUEUE_FAILPOINTS": "worker.after_record=kill9"})
    job = enqueue(c, ledger_path, "rec", seconds=0.1)
    assert dying.wait(15) == -signal.SIGKILL
    assert fault_jobs.completed(ledger_path) == {"rec"}
    assert row(c.config, job.id) is None, "the outcome was recorded before the kill"
    normal = f"{c.config.prefix}.balance.normal"
    wait_until(lambda: queue_depth(c.config, normal)[0] == 1, 10, "the unacked delivery back")

    survivor = c.worker()
    survivor.wait_log(f"job {job.id} not taken: missing", timeout=15)
    enqueue(c, ledger_path, "after")  # the survivor keeps working
    wait_completed(ledger_path, ["after"], 15, c)

    fault_jobs.check(ledger_path, ["rec", "after"], deaths=c.deaths).assert_ok()
    assert_settled(c.config)


# --- 3. TERM: a short job finishes; a long one is released past the grace ---------------------


def test_term_during_a_short_job_finishes_it_and_exits_0(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql")
    worker = c.worker()
    enqueue(c, ledger_path, "short", seconds=1.0)
    wait_until(lambda: fault_jobs.runs_of(ledger_path, "short"), 15, "the job to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(STOP_GRACE + 5) == 0, worker.log()[-3000:]
    fault_jobs.check(ledger_path, ["short"]).assert_ok()
    assert_settled(c.config)


def test_term_past_the_grace_releases_the_job_and_it_runs_again_promptly(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql")
    stopping = c.worker()
    job = enqueue(c, ledger_path, "long", seconds=4.0)
    wait_until(lambda: fault_jobs.runs_of(ledger_path, "long"), 15, "the job to start")
    other = c.worker()  # started once the job is taken, so it cannot take it first

    signalled = time.time()
    stopping.signal(signal.SIGTERM)
    assert stopping.wait(STOP_GRACE + 4) == 0, stopping.log()[-3000:]
    exited = time.time() - signalled
    wait_completed(ledger_path, ["long"], 15, c)

    fault_jobs.check(ledger_path, ["long"], exactly_once=False).assert_ok()
    interrupted, rerun = fault_jobs.runs_of(ledger_path, "long")
    assert interrupted.status == "WorkerStopping", interrupted
    assert interrupted.end is not None
    assert STOP_GRACE - 0.2 <= interrupted.end - signalled < STOP_GRACE + 1.5
    assert rerun.pid == other.pid and rerun.status == "ok"
    assert (rerun.attempts, rerun.crashes) == (0, 0), "a stop is not an attempt"
    gap = rerun.start - interrupted.end
    print(f"\nTERM past grace: exited after {exited:.2f}s, run again {gap:.2f}s after release")
    assert gap < 2.0, "the released job did not run again promptly"
    # the ledger's "end ok" is written by the job; its row is deleted a moment later
    wait_until(lambda: row(c.config, job.id) is None, 10, "the completed job's row to go")
    assert_settled(c.config)


# --- 4. a job that aborts its worker: bounded by max_crashes; other jobs keep flowing ---------


def test_aborting_job_fails_after_max_crashes_while_others_flow(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql", TOMQUEUE_MAX_CRASHES="2")
    c.deferred()
    supervisor = c.worker("-n", "2", "--threads", "2")
    bomb = Delayed.enqueue(AbortJob(ledger_path, "bomb"), config=c.config)
    before = [f"a{i}" for i in range(20)]
    enqueue_many(c, ledger_path, before, seconds=0.05)
    wait_until(lambda: fault_jobs.runs_of(ledger_path, "bomb"), 15, "the first abort")
    after = [f"b{i}" for i in range(20)]
    enqueue_many(c, ledger_path, after, seconds=0.05)  # while the first crash is recovered

    def failed() -> bool:
        r = row(c.config, bomb.id)
        return r is not None and r.failed_at is not None

    wait_until(failed, 2 * TAKEOVER + 10, "the aborting job to end failed", interval=0.1)
    wait_completed(ledger_path, before + after, 15, c)

    # A job that happened to run beside the bomb died with its process: it runs again
    # (at least once), never overlapping. The bomb's own end line is when its process died.
    aborted = {r.pid: (r.end or 0.0) + 0.05 for r in fault_jobs.runs_of(ledger_path, "bomb")}
    fault_jobs.check(
        ledger_path, before + after, {"bomb": 2}, deaths=aborted, exactly_once=False
    ).assert_ok()
    assert [r.status for r in fault_jobs.runs_of(ledger_path, "bomb")] == ["abort", "abort"]
    r = row(c.config, bomb.id)
    assert (r.attempts, r.crashes) == (2, 2), describe(r)
    assert "WorkerCrashed" in r.last_error and "crash 2 of at most 2" in r.last_error
    assert "giving up" in r.last_error
    assert supervisor.alive(), "the supervisor keeps running"
    assert log_lines(supervisor.log(), "exited with -6; starting another") == 2
    assert_settled(c.config, failed=[bomb.id])


# --- 5. broker connections closed, broker restarted, during a run -----------------------------


def test_worker_connections_closed_by_name_during_a_run(
    clusters: MakeCluster, ledger_path: str
) -> None:
    """On the shared broker: only our processes' connections, found by their names."""
    c = clusters("postgresql")
    c.deferred()
    workers = c.workers(2, "--threads", "4")
    markers = [f"j{i}" for i in range(1000)]
    producer = Producer(c, ledger_path, markers, rate=400)
    producer.start()
    closed = 0
    for fraction in (0.15, 0.5):
        wait_until(lambda f=fraction: completed_count(ledger_path) >= f * len(markers), 60, "")
        closed += brokerctl.close_connections(pids_of(c), roles=("worker", "publisher", "deferred"))
    producer.join(60)
    assert not producer.errors, producer.errors
    wait_completed(ledger_path, markers, 60, c)

    assert closed >= 4, f"only {closed} connection(s) found to close"
    for worker in workers:
        assert "broker connection lost" in worker.log(), worker.log()[-3000:]
    fault_jobs.check(ledger_path, markers).assert_ok()
    assert_settled(c.config)


def test_whole_broker_faults_during_a_2000_job_run(
    clusters: MakeCluster,
    private_broker: brokerctl.PrivateBroker,
    ledger_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A private RabbitMQ node: close_all_connections, then stop_app / start_app while jobs
    are being enqueued (publishes fail: the sweeper delivers those) and worked.

    The producer's background publisher gives a notification up after 1 s (the default is
    30 s, longer than this outage: it would re-send them all once the node is back), so
    that the jobs enqueued while the node is down reach their workers through the
    sweeper."""
    c = clusters("postgresql", amqp_url=private_broker.url)
    c.config = c.config.replace(publish_retry_for=1.0)
    c.deferred()
    workers = c.workers(3, "--threads", "4")
    markers = [f"j{i}" for i in range(2000)]
    # 150/s: each rabbitmqctl call below takes 2-3 s on a slow host, and 300 of the 2,000
    # enqueues must still come once stop_app has returned (at 250/s the producer had
    # 1,825 behind it by then in one run)
    producer = Producer(c, ledger_path, markers, rate=150)
    producer.start()
    started = time.monotonic()

    wait_until(lambda: completed_count(ledger_path) >= 400, 60, "400 jobs done")
    private_broker.ctl("close_all_connections", "test")
    wait_until(lambda: completed_count(ledger_path) >= 900, 60, "900 jobs done")
    private_broker.ctl("stop_app")
    stopped = time.monotonic()
    enqueued_before = producer.enqueued
    wait_until(lambda: producer.enqueued >= enqueued_before + 300, 30, "enqueues while down")
    private_broker.ctl("start_app")
    private_broker.wait_accepting(60)
    down = time.monotonic() - stopped
    producer.join(60)
    assert not producer.errors, producer.errors
    wait_completed(ledger_path, markers, 90, c)
    took = time.monotonic() - started

    report = fault_jobs.check(ledger_path, markers)
    unpublished = sum(1 for r in caplog.records if "not confirmed" in r.getMessage())
    print(
        f"\n2,000 jobs across close_all_connections and a {down:.1f}s stop_app "
        f"({unpublished} publishes failed after commit): {took:.1f}s"
    )
    report.assert_ok()
    assert unpublished >= 100, "enqueues while the broker was down should fail to publish"
    for worker in workers:
        assert log_lines(worker.log(), "broker connection lost") >= 2, worker.log()[-3000:]
    assert_settled(c.config, timeout=30)


# --- 5b. the broker blocks publishers (disk alarm) during a run -------------------------------

BLOCKED_PUBLISH_TIMEOUT = 3.0  # the enqueuing process's publish_timeout in this scenario
BLOCKED_ENQUEUE_BOUND = BLOCKED_PUBLISH_TIMEOUT + 2.0


def broker_alarms(node: brokerctl.PrivateBroker) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().")


class TimedEnqueues(threading.Thread):
    """Enqueues ``markers`` one after the other, timing each call."""

    def __init__(self, cluster: Cluster, ledger: str, markers: list[str], **config: object):
        super().__init__(name="timed-enqueues", daemon=True)
        self.config = cluster.config.replace(**config)
        self.ledger, self.markers = ledger, markers
        self.took: list[float] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        for marker in self.markers:
            started = time.monotonic()
            try:
                Delayed.enqueue(LedgerJob(self.ledger, marker), config=self.config)
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
            self.took.append(time.monotonic() - started)


@pytest.mark.parametrize("sync_publish", [False, True], ids=["async", "sync_publish"])
def test_broker_disk_alarm_blocks_publishers_during_a_run(
    clusters: MakeCluster,
    private_broker: brokerctl.PrivateBroker,
    ledger_path: str,
    sync_publish: bool,
) -> None:
    """``rabbitmqctl set_disk_free_limit 100000GB`` on a private node while 2 workers drain
    200 jobs: the workers (whose connections do not publish) go on; three enqueues made
    during the alarm each return within ``publish_timeout`` + 2 s with the row committed
    (the sweeper delivers the notification later); after ``set_disk_free_limit 50MB``
    every job runs exactly once and nothing is left behind."""
    c = clusters("postgresql", amqp_url=private_broker.url)
    workers = c.workers(2, "--threads", "4")
    backlog = [f"a{i}" for i in range(200)]
    enqueue_many(c, ledger_path, backlog, seconds=0.1)  # about 2.5 s of work
    blocked = TimedEnqueues(
        c,
        ledger_path,
        ["b0", "b1", "b2"],
        publish_timeout=BLOCKED_PUBLISH_TIMEOUT,
        sync_publish=sync_publish,
    )
    private_broker.ctl("set_disk_free_limit", "100000GB")
    try:
        wait_until(lambda: "disk" in broker_alarms(private_broker), 15, "the disk alarm")
        alarmed = time.time()
        blocked.start()
        wait_completed(ledger_path, backlog, 30, c)  # the workers go on meanwhile
        assert not fault_jobs.started(ledger_path) & {"b0", "b1", "b2"}, "published anyway?"
        handlers = [r.handler for r in rows(c.config)]
        assert any('"b0"' in h for h in handlers), "the first blocked enqueue's row is committed"
        blocked.join(len(blocked.markers) * BLOCKED_ENQUEUE_BOUND + 2.0)
        returned = list(blocked.took)
    finally:
        private_broker.ctl("set_disk_free_limit", "50MB")
        cleared = time.time()
    wait_until(lambda: "disk" not in broker_alarms(private_broker), 15, "the alarm to clear")
    blocked.join(15)  # calls still blocked when the alarm cleared finish now
    assert not blocked.is_alive(), "an enqueue still hangs after the alarm cleared"
    assert not blocked.errors, blocked.errors
    wait_completed(ledger_path, backlog + blocked.markers, SWEEP + 15.0, c)

    late = max(r.start for r in fault_jobs.runs(ledger_path) if r.marker[0] == "b") - cleared
    print(
        f"\ndisk alarm for {cleared - alarmed:.1f}s: enqueues returned after "
        f"{[round(t, 1) for t in blocked.took]}s ({len(returned)} within the alarm); "
        f"their jobs ran at most {late:.1f}s after it cleared"
    )
    fault_jobs.check(ledger_path, backlog + blocked.markers).assert_ok()
    for worker in workers:
        assert worker.alive(), worker.log()[-3000:]
    assert_settled(c.config)
    assert len(returned) == len(blocked.markers), (
        f"only {len(returned)} of {len(blocked.markers)} enqueues returned while the broker "
        f"blocked publishers ({len(blocked.markers) * BLOCKED_ENQUEUE_BOUND + 2.0:g}s)"
    )
    assert max(returned) <= BLOCKED_ENQUEUE_BOUND, f"blocked enqueues took {returned}"


# --- 5c. the broker closes a worker's consuming channel (not its connection) -----------------

FAST_CONSUMER_TIMEOUT = "[{rabbit,[{consumer_timeout,5000},{channel_tick_interval,1000}]}].\n"


@pytest.fixture(scope="module")
def timeout_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[brokerctl.PrivateBroker]:
    """A private node whose consumer_timeout is 5 s (checked every second)."""
    node = brokerctl.PrivateBroker(
        tmp_path_factory.mktemp("rabbit-timeout"), FAST_CONSUMER_TIMEOUT, "tqtimeout"
    )
    try:
        node.start()
        assert "{ok,5000}" in node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
        yield node
    finally:
        node.stop()


def test_worker_consuming_channel_closed_by_the_broker_keeps_working(
    clusters: MakeCluster, timeout_broker: brokerctl.PrivateBroker, ledger_path: str
) -> None:
    """A job holds its delivery past the node's 5 s consumer_timeout (the worker's
    ``delivery_hold_limit`` is 600 s, so it does not ack early): the broker closes the
    worker's consuming channel with 406. The job still completes once, and the same
    worker process runs the jobs enqueued afterwards."""
    c = clusters("postgresql", amqp_url=timeout_broker.url, TOMQUEUE_DELIVERY_HOLD_LIMIT="600")
    worker = c.worker("--threads", "2")
    closed_before = timeout_broker.timeouts_logged()
    enqueue(c, ledger_path, "long", seconds=8.0)
    wait_until(
        lambda: timeout_broker.timeouts_logged() > closed_before,
        15,
        "the broker to close the worker's channel (consumer_timeout)",
    )
    wait_completed(ledger_path, ["long"], 10, c)
    after = [f"after{i}" for i in range(20)]
    enqueue_many(c, ledger_path, after)
    wait_completed(ledger_path, after, 15, c)
    fault_jobs.check(ledger_path, ["long", *after]).assert_ok()
    assert worker.alive() and {r.pid for r in fault_jobs.runs(ledger_path)} == {worker.pid}
    assert_settled(c.config)


# --- 6. database sessions killed; PostgreSQL restarted ----------------------------------------


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_database_sessions_killed_while_jobs_run(
    clusters: MakeCluster, database: str, ledger_path: str
) -> None:
    """Every database session of the workers and the deferred manager (found by client
    port, never the test's own) is killed (pg_terminate_backend / KILL) three times while
    jobs run; each time all 8 job threads are in the middle of a job."""
    c = clusters(database)
    c.deferred()
    c.workers(2, "--threads", "4")
    markers: list[str] = []
    killed = 0
    for wave in range(3):
        batch = [f"w{wave}-{i}" for i in range(8)]
        markers += batch
        done_before = completed_count(ledger_path)
        enqueue_many(c, ledger_path, batch, seconds=1.5)
        wait_until(
            lambda b=batch: {r.marker for r in fault_jobs.runs(ledger_path)} >= set(b),
            15,
            "the wave to start",
        )
        killed += dbctl.kill_sessions(c.config, pids=pids_of(c))  # not the test's own
        wait_until(lambda n=done_before: completed_count(ledger_path) >= n + 8, 20, "the wave")
    quick = [f"q{i}" for i in range(100)]  # and the workers keep going
    enqueue_many(c, ledger_path, quick)
    wait_completed(ledger_path, markers + quick, 30, c)

    assert killed >= 6, f"only {killed} session(s) killed"
    fault_jobs.check(ledger_path, markers + quick).assert_ok()
    assert_settled(c.config)


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_database_session_killed_while_the_outcome_is_written(
    clusters: MakeCluster, database: str, ledger_path: str
) -> None:
    """Deterministic: the test holds the job's row lock while the job finishes, so the
    worker's fenced DELETE waits on it; that waiting session is killed. The worker still
    holds its lock (it keeps heartbeating): it must write the outcome again, not leave the
    row locked until max_run_time, and the job must not run again."""
    c = clusters(database)
    c.deferred()
    c.workers(2)
    job = enqueue(c, ledger_path, "rec", seconds=1.0)
    wait_until(lambda: fault_jobs.runs_of(ledger_path, "rec"), 15, "the job to start")
    like = "DELETE FROM delayed_jobs%"
    with dbctl.row_lock(c.config, "delayed_jobs", job.id) as observer:
        # (InnoDB refreshes its lock-wait view only when not read for 0.1 s: poll slowly)
        waiting = lambda: dbctl.waiting_on_lock(observer, c.config, like) == 1  # noqa: E731
        wait_until(waiting, 10, "the worker's DELETE to wait on the row lock", interval=0.3)
        assert dbctl.kill_sessions(c.config, like) == 1
    killed_at = time.time()

    def gone() -> bool:
        return row(c.config, job.id) is None

    try:
        wait_until(gone, TAKEOVER + 5.0, "the job's row to be deleted", interval=0.1)
    finally:
        print("\n" + "\n".join(describe(r) for r in rows(c.config)))
    fault_jobs.check(ledger_path, ["rec"]).assert_ok()
    assert time.time() - killed_at < TAKEOVER + 5.0
    assert_settled(c.config)


# --- 6b. a private database server restarted or killed during a run --------------------------


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[dbservers.PrivatePostgres]:
    server = dbservers.PrivatePostgres()
    try:
        server.start()
        server.create_database()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[dbservers.PrivateMariaDB]:
    server = dbservers.PrivateMariaDB()
    try:
        server.start()
        server.create_database()
        yield server
    finally:
        server.close()


def private_database(request: pytest.FixtureRequest, database: str) -> dbservers.Server:
    name = "private_postgres" if database == "postgresql" else "private_mariadb"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def restart_database(server: dbservers.Server, how: str, down_for: float = 0.0) -> float:
    """``fast`` / ``immediate``: ``pg_ctl stop -m <how>``; ``shutdown``:
    ``mariadb-admin shutdown``; ``kill9``: SIGKILL of the server. Then, ``down_for`` seconds
    later, start again on the same data directory and port. Returns the seconds until it
    accepted connections again."""
    started = time.monotonic()
    if how in ("fast", "immediate"):
        assert isinstance(server, dbservers.PrivatePostgres)
        server.stop(how)
    elif how == "shutdown":
        assert isinstance(server, dbservers.PrivateMariaDB)
        server.shutdown()
    else:
        assert how == "kill9", how
        server.kill9()
    time.sleep(down_for)  # the outage lasts this long: nothing to poll
    server.start()
    return time.monotonic() - started


# A clean stop and a quick restart; a crash and an outage of several missed heartbeats.
# Shorter than the lease: the workers keep their locks, so no job may complete twice (an
# outage longer than the lease is the proxy tests' business: at least once, no overlap).
DATABASE_RESTARTS = [
    ("postgresql", "fast", 0.0),
    ("postgresql", "immediate", LEASE / 2),
    ("mysql", "shutdown", 0.0),
    ("mysql", "kill9", LEASE / 2),
]


def in_flight(ledger: str) -> int:
    return len(fault_jobs.started(ledger) - fault_jobs.completed(ledger))


@pytest.mark.parametrize(("database", "how", "down_for"), DATABASE_RESTARTS, ids=str)
def test_private_database_restarted_during_a_run(
    clusters: MakeCluster,
    request: pytest.FixtureRequest,
    database: str,
    how: str,
    down_for: float,
    ledger_path: str,
) -> None:
    """A database server of the test's own is stopped (PostgreSQL ``pg_ctl stop -m fast``
    or ``-m immediate``, MariaDB ``mariadb-admin shutdown`` or ``kill -9`` of mariadbd) and
    started again on the same data directory and port — at once after a clean stop, 1.5 s
    later after a crash — while 2 workers x 4 threads work 300 jobs of 0.1 s (so about 8
    are in the middle of running). Every job completes exactly once (a run the worker
    stopped because its lease was in danger may be run again, never overlapping), and the
    same worker processes take the 100 jobs enqueued afterwards."""
    server = private_database(request, database)
    c = clusters(database, database_url=server.url())
    c.deferred()
    workers = c.workers(2, "--threads", "4")
    first = [f"a{i}" for i in range(300)]
    enqueue_many(c, ledger_path, first, seconds=0.1)
    wait_until(lambda: completed_count(ledger_path) >= 60, 30, "60 jobs done")
    running = in_flight(ledger_path)
    down = restart_database(server, how, down_for)
    back = time.time()
    get_engine(c.config).dispose()  # the test's own pool is stale too (no pre-ping)
    second = [f"b{i}" for i in range(100)]
    enqueue_many(c, ledger_path, second, seconds=0.01)
    wait_completed(ledger_path, first + second, 45, c)

    report = fault_jobs.check(ledger_path, first + second, exactly_once=False)
    rerun = sorted({r.marker for r in report.runs if r.status != "ok"})
    print(
        f"\n{database} {how}: down {down:.2f}s with {running} job(s) running; "
        f"{len(rerun)} run(s) interrupted and run again {rerun[:8]}; all 400 done "
        f"{max(r.end or 0.0 for r in report.runs) - back:.1f}s after the restart"
    )
    report.assert_ok()
    after = fault_jobs.runs(ledger_path)
    assert any("OperationalError" in w.log() for w in workers), "no worker saw the outage"
    for worker in workers:
        assert worker.alive(), f"{worker.name} exited:\n{worker.log()[-3000:]}"
        assert any(r.pid == worker.pid and r.start > back for r in after), (
            f"{worker.name} took no job after the restart:\n{worker.log()[-3000:]}"
        )
    assert_settled(c.config)


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_private_database_restarted_again_and_again_during_a_long_run(
    clusters: MakeCluster,
    request: pytest.FixtureRequest,
    database: str,
    ledger_path: str,
) -> None:
    """Slow (~40 s each): 3,000 jobs enqueued at 100/s by a producer that keeps going
    through the outages (an enqueue that cannot reach the database raises: counted), while
    3 workers work them and the server is restarted six times, alternating a clean stop and
    a crash with 1.5 s of outage (PostgreSQL ``-m fast`` / ``-m immediate``, MariaDB
    ``mariadb-admin shutdown`` / kill -9)."""
    server = private_database(request, database)
    c = clusters(database, database_url=server.url())
    c.deferred()
    workers = c.workers(3, "--threads", "4")
    producer = Producer(c, ledger_path, [f"j{i}" for i in range(3000)], rate=100, tolerant=True)
    producer.start()
    modes = ["fast", "immediate"] if database == "postgresql" else ["shutdown", "kill9"]
    downs = []
    for i in range(6):
        wait_until(lambda n=i: producer.attempted >= (n + 1) * 450, 60, "the producer to go on")
        downs.append(restart_database(server, modes[i % 2], down_for=(i % 2) * LEASE / 2))
        get_engine(c.config).dispose()
    producer.join(120)
    assert not producer.is_alive()
    wait_completed(ledger_path, producer.committed, 90, c)
    # an enqueue that raised at its COMMIT may have committed all the same: such a job may run
    ran_anyway = sorted(set(producer.refused) & fault_jobs.started(ledger_path))
    print(
        f"\n{database}: 6 restarts (down {min(downs):.2f}-{max(downs):.2f}s); "
        f"{len(producer.committed)} jobs committed, {len(producer.refused)} enqueue(s) "
        f"refused ({len(ran_anyway)} of them committed all the same)"
    )
    expected = producer.committed + ran_anyway
    fault_jobs.check(ledger_path, expected, exactly_once=False).assert_ok()
    for worker in workers:
        assert worker.alive(), worker.log()[-3000:]
    assert_settled(c.config, timeout=30)


# --- 7. publish failure after the commit: the sweeper delivers --------------------------------


def test_publish_failure_after_commit_is_delivered_by_the_sweeper(
    clusters: MakeCluster, ledger_path: str, tmp_path: Path
) -> None:
    c = clusters("postgresql")
    c.workers(2)
    enqueuer = c.process(
        "enqueue",
        ["-m", "tests.fault_jobs", "enqueue", ledger_path, "p", "5"],
        c.env(TOMQUEUE_FAILPOINTS="enqueue.before_publish=raise"),
    )
    assert enqueuer.wait(30) == 0, enqueuer.log()
    committed = rows(c.config)
    assert len(committed) == 5, enqueuer.log()
    published_at = time.time()
    markers = [f"p{i}" for i in range(5)]
    wait_completed(ledger_path, markers, SWEEP + 5.0, c)
    late = max(r.start for r in fault_jobs.runs(ledger_path)) - published_at
    print(f"\npublish failed after commit: all 5 ran within {late:.2f}s (sweeper)\n")
    print(enqueuer.log()[-600:])
    fault_jobs.check(ledger_path, markers).assert_ok()
    assert_settled(c.config)


def test_enqueue_returns_normally_when_the_publish_fails_after_commit(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql")
    enqueuer = c.process(
        "enqueue",
        ["-m", "tests.fault_jobs", "enqueue", ledger_path, "p", "2"],
        c.env(TOMQUEUE_FAILPOINTS="enqueue.before_publish=raise"),
    )
    assert enqueuer.wait(30) == 0, enqueuer.log()
    assert len(rows(c.config)) == 2, "both rows are committed"
    printed = [ln for ln in enqueuer.log().splitlines() if ln.startswith("committed ")]
    assert len(printed) == 2, enqueuer.log()[-2000:]
    assert log_lines(enqueuer.log(), "notification was not confirmed") == 2


# --- 8. a TCP proxy between a worker and the broker / the database ----------------------------


def via(url: str, proxy: TcpProxy, port: int) -> str:
    return url.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")


def test_broker_partition_and_reset_through_a_proxy(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql")
    assert c.config.amqp_url and "127.0.0.1:5672" in c.config.amqp_url
    proxy = TcpProxy("127.0.0.1", 5672)
    try:
        amqp = via(c.config.amqp_url, proxy, 5672) + "?heartbeat=2"
        c.deferred()
        cut = c.worker("--threads", "4", config=c.config.replace(amqp_url=amqp))
        c.worker("--threads", "4")
        markers: list[str] = []
        for mode, seconds in (("blackhole", 9.0), ("reset", 2.0)):
            batch = [f"{mode}{i}" for i in range(300)]
            markers += batch
            producer = Producer(c, ledger_path, batch, rate=150)
            producer.start()
            wait_until(lambda b=batch: len(fault_jobs.started(ledger_path) & set(b)) > 50, 30, "")
            consuming = log_lines(cut.log(), "consuming")
            proxy.set_mode(mode)
            time.sleep(seconds)  # the fault lasts this long: nothing to poll
            proxy.set_mode("pass")
            healed = time.time()
            producer.join(60)
            assert not producer.errors, producer.errors
            wait_completed(ledger_path, batch, 60, c)
            # the cut worker reconnects (bounded backoff) and takes part in a new batch
            cut.wait_log("consuming", timeout=45, count=consuming + 1)
            back = time.time() - healed
            print(f"\nbroker {mode} {seconds:g}s: consuming again {back:.1f}s later")
            probe = [f"{mode}-after{i}" for i in range(100)]
            markers += probe
            enqueue_many(c, ledger_path, probe, seconds=0.05)
            wait_completed(ledger_path, probe, 30, c)
            after = [r for r in fault_jobs.runs(ledger_path) if r.start > healed]
            assert any(r.pid == cut.pid for r in after), f"{cut.name} did not recover ({mode})"
        assert log_lines(cut.log(), "broker connection lost") >= 2, cut.log()[-3000:]
        fault_jobs.check(ledger_path, markers).assert_ok()
        assert_settled(c.config)
    finally:
        proxy.close()


def test_database_partition_longer_than_the_lease_through_a_proxy(
    clusters: MakeCluster, ledger_path: str
) -> None:
    """The worker cut from the database stops its job before its lease can expire; another
    worker takes the job over after the lease; the runs never overlap. Then the same with
    resets instead of a silent partition. Afterwards the cut worker works again."""
    c = clusters("postgresql")
    proxy = TcpProxy("127.0.0.1", 5432)
    try:
        c.deferred()
        cut = c.worker(
            config=c.config.replace(database_url=via(c.config.database_url, proxy, 5432))
        )
        markers: list[str] = []
        for mode, seconds in (("blackhole", 6.0), ("reset", 5.0)):
            marker = f"{mode}-job"
            markers.append(marker)
            enqueue(c, ledger_path, marker, seconds=6.0)
            wait_until(lambda m=marker: fault_jobs.runs_of(ledger_path, m), 15, "the job to start")
            assert fault_jobs.runs_of(ledger_path, marker)[0].pid == cut.pid
            other = c.worker()
            proxy.set_mode(mode)
            cut_at = time.monotonic()
            # The fault lasts ``seconds`` and at least until the other worker has taken the
            # job over (lease, then a sweep: ~5.2 s here). Healed first, the cut worker would
            # release the job itself and might run it again (seen once on a slow host).
            wait_until(
                lambda m=marker: len(fault_jobs.runs_of(ledger_path, m)) > 1,
                TAKEOVER + 10.0,
                "another worker to take the job over",
            )
            print(f"\ndatabase {mode}: taken over {time.monotonic() - cut_at:.1f}s into the fault")
            time.sleep(max(0.0, cut_at + seconds - time.monotonic()))  # nothing to poll
            proxy.set_mode("pass")
            wait_completed(ledger_path, [marker], 30, c)
            first, *rest = fault_jobs.runs_of(ledger_path, marker)
            assert first.status == "WorkerStopping", first
            assert rest and rest[-1].pid == other.pid
            other.stop()
            # the cut worker is back and alone: it runs the next job
            probe = f"{mode}-after"
            markers.append(probe)
            enqueue(c, ledger_path, probe)
            wait_completed(ledger_path, [probe], 30, c)
            assert fault_jobs.runs_of(ledger_path, probe)[0].pid == cut.pid
        fault_jobs.check(ledger_path, markers, exactly_once=False, deaths=c.deaths).assert_ok()
        assert_settled(c.config)
    finally:
        proxy.close()


def test_a_worker_cut_from_the_database_gives_its_deliveries_back(
    clusters: MakeCluster, ledger_path: str
) -> None:
    """A worker that cannot renew its lease may lock nothing. What the broker sends it goes
    back within about ``LEASE_LOST_HOLD`` for workers that can reach the database (here
    the only way: the other worker does not sweep), and meanwhile its dispatch loop waits
    for the broker instead of spinning over the deliveries it may not start."""
    c = clusters("postgresql")
    proxy = TcpProxy("127.0.0.1", 5432)
    try:
        cut = c.worker(
            config=c.config.replace(database_url=via(c.config.database_url, proxy, 5432))
        )
        proxy.set_mode("reset")
        cut.wait_log("lease valid: False", timeout=LEASE + 10)
        markers = [f"held{i}" for i in range(3)]
        for marker in markers:
            enqueue(c, ledger_path, marker)
        # its window (prefetch) holds them all: none is ready in the queue
        normal = Topology.of(c.config).queue_name(None, "normal")
        wait_until(lambda: queue_depth(c.config, normal)[0] == 0, 10, "the cut worker to hold them")
        before = cpu_seconds(cut.pid)
        time.sleep(2.0)  # a window to measure its CPU in: nothing to poll
        spent = cpu_seconds(cut.pid) - before
        assert spent < 0.5, f"{cut.name} used {spent:.2f} s of CPU in 2 s, starting nothing"
        assert not fault_jobs.runs(ledger_path)
        c.worker(env={"TOMQUEUE_SWEEP_INTERVAL": "600"})
        wait_completed(ledger_path, markers, 30, c)
        assert all(r.pid != cut.pid for r in fault_jobs.runs(ledger_path))
        fault_jobs.check(ledger_path, markers).assert_ok()
    finally:
        proxy.close()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _logged_exit_time(log: str) -> float:
    """The time of the worker's last 'exiting' log line (it calls os._exit right after)."""
    from datetime import UTC, datetime

    line = [ln for ln in log.splitlines() if "exiting" in ln][-1]
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
    return stamp.timestamp() + 0.01


def test_database_partition_with_a_job_blocked_in_a_call_never_overlaps(
    clusters: MakeCluster, ledger_path: str
) -> None:
    """The cut worker cannot stop a job blocked in one long call before its lease expires;
    the job must still never run in two places at once."""
    c = clusters("postgresql")
    proxy = TcpProxy("127.0.0.1", 5432)
    try:
        c.deferred()
        cut = c.worker(
            config=c.config.replace(database_url=via(c.config.database_url, proxy, 5432))
        )
        c.worker()
        Delayed.enqueue(BlockingJob(ledger_path, "stuck", 7.0), config=c.config)
        wait_until(lambda: fault_jobs.runs_of(ledger_path, "stuck"), 15, "the job to start")
        assert fault_jobs.runs_of(ledger_path, "stuck")[0].pid == cut.pid
        proxy.set_mode("blackhole")
        # The cut worker cannot stop the blocked call: it must exit before its lease lapses.
        wait_until(lambda: not cut.alive(), 10, "the cut worker to exit by itself")
        assert cut.proc.returncode == 3, cut.log()[-2000:]
        cut.died_at = _logged_exit_time(cut.log())  # when it said it was exiting, at once
        proxy.set_mode("pass")
        wait_completed(ledger_path, ["stuck"], 30, c)
        fault_jobs.check(ledger_path, ["stuck"], deaths=c.deaths, exactly_once=False).assert_ok()
        assert_settled(c.config)
    finally:
        proxy.close()


def test_short_database_reset_when_a_job_finishes_through_a_proxy(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql")
    proxy = TcpProxy("127.0.0.1", 5432)
    try:
        c.deferred()
        cut = c.worker(
            config=c.config.replace(database_url=via(c.config.database_url, proxy, 5432))
        )
        c.worker()
        job = enqueue(c, ledger_path, "edge", seconds=1.5)
        wait_until(lambda: fault_jobs.runs_of(ledger_path, "edge"), 15, "the job to start")
        assert fault_jobs.runs_of(ledger_path, "edge")[0].pid == cut.pid
        time.sleep(1.0)  # into the job: nothing to poll
        proxy.set_mode("reset")
        wait_until(lambda: fault_jobs.completed(ledger_path), 5, "the job's end")
        time.sleep(0.5)  # the outage lasts 1.5 s in all, well below the 3 s lease
        proxy.set_mode("pass")
        healed = time.time()

        def gone() -> bool:
            return row(c.config, job.id) is None

        try:
            wait_until(gone, TAKEOVER + 5.0, "the job's row to be deleted", interval=0.1)
        finally:
            print("\n" + "\n".join(describe(r) for r in rows(c.config)))
        assert time.time() - healed < TAKEOVER + 5.0
        fault_jobs.check(ledger_path, ["edge"], exactly_once=False).assert_ok()
        assert_settled(c.config)
    finally:
        proxy.close()


# --- 9. the deferred manager killed (-9) while holding jobs -----------------------------------


def test_deferred_manager_kill9_while_holding_then_restart(
    clusters: MakeCluster, ledger_path: str
) -> None:
    c = clusters("postgresql")
    manager = c.deferred()
    c.workers(2, "--threads", "4")
    markers = [f"d{i}" for i in range(200)]
    with ThreadPoolExecutor(4) as pool:
        jobs = list(
            pool.map(
                lambda i: enqueue(
                    c, ledger_path, markers[i], run_at=timedelta(seconds=5 + 2 * i / 200)
                ),
                range(200),
            )
        )
    due = {m: j.run_at.replace(tzinfo=UTC).timestamp() for m, j in zip(markers, jobs, strict=True)}
    deferred_queue = f"{c.config.prefix}.work.deferred"
    wait_until(lambda: queue_depth(c.config, deferred_queue)[0] == 0, 10, "all held")
    manager.kill9()
    wait_until(lambda: queue_depth(c.config, deferred_queue)[0] == 200, 10, "requeued")
    assert fault_jobs.runs(ledger_path) == [], "nothing ran before it was due"
    c.deferred()
    wait_completed(ledger_path, markers, 30, c)

    fault_jobs.check(ledger_path, markers).assert_ok()
    early = [(r.marker, round(due[r.marker] - r.start, 4)) for r in fault_jobs.runs(ledger_path)]
    early = [e for e in early if e[1] > 0]
    assert not early, f"ran before run_at: {early[:10]}"
    late = max(r.start - due[r.marker] for r in fault_jobs.runs(ledger_path))
    print(f"\nafter the manager's kill -9: 200 jobs, none early, at most {late:.2f}s late")
    assert_settled(c.config)
