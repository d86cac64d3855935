"""Soak: sustained load with the faults of the fault suite injected on a schedule.

    python -m bench.soak --minutes 10 [--database postgresql|mysql] [--private-db]
                         [--rate 40] [--workers 3] [--threads 4] [--fault-every 15]
                         [--workdir DIR]

Not run in CI. Starts a private RabbitMQ node (so whole-node faults touch nobody else), a
deferred manager, ``--workers`` plain workers, one worker behind a TCP proxy to the
database and one behind a TCP proxy to the broker (``?heartbeat=2``), all with the fault
suite's short timings. A producer enqueues ``tests.fault_jobs.LedgerJob``s at ``--rate``
per second (mostly short, some of 1-3 s, some 1-10 s in the future) while a scheduler
injects, in turn: kill -9 of a worker, TERM of a worker, broker connections closed by name,
broker ``stop_app``/``start_app``, every database session killed, kill -9 of the deferred
manager, database partition (blackhole) and resets, broker partition, publish failures
after commit (a failpoint in an enqueuing process), a 5 s disk alarm on the broker
(publishers blocked). Killed and stopped processes are restarted. With ``--private-db`` the
database is a private server of the soak's own (``tests/e2e/faults/dbservers.py``) and the
faults include its restart, alternating a clean stop (PostgreSQL ``pg_ctl stop -m fast``,
MariaDB ``mariadb-admin shutdown``) and a crash (``-m immediate``, kill -9) with 1.5 s of
outage.

At the end it waits for the backlog to drain (bounded), then prints from the run ledger:
jobs done, lost (never completed), duplicated (completed twice), re-run (started again
after a lost lock, never overlapping), overlapping (two runs of one job at once), the
longest recovery (the largest lateness of a job due within 2 s after a fault), and what is
left in ``delayed_jobs``. Exit status 1 if anything was lost or overlapped.

The database is ``TOMQUEUE_SOAK_DATABASE_URL`` or else the test database
(``TOMQUEUE_TEST_POSTGRES_URL`` / ``TOMQUEUE_TEST_MYSQL_URL``); its jobs table is emptied.
``--private-db`` uses neither.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, timedelta
from pathlib import Path

from sqlalchemy.engine import make_url

from tests import fault_jobs
from tests.conftest import delete_broker_objects, make_config, reset_database
from tests.e2e.faults import dbctl, dbservers
from tests.e2e.faults.broker import PrivateBroker
from tests.e2e.faults.cluster import Cluster, Proc, rows
from tests.e2e.faults.proxy import TcpProxy
from tomqueue import Delayed
from tomqueue.db import dispose_engines, get_engine
from tomqueue.transport import close_publishers

RECOVERY_WINDOW = 2.0  # a job due this soon after a fault counts towards its recovery


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="tomqueue-soak-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.ledger = str(self.work / "ledger.txt")
        self.broker = PrivateBroker(self.work / "rabbit")
        self.due: dict[str, float] = {}  # marker -> unix time it became due
        self.faults: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.refused_at: list[float] = []  # when an enqueue raised
        self.stop = threading.Event()
        self.counter = itertools.count()
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.db_server: dbservers.Server | None = None
        self.faults_cycle = self.FAULTS + (("db_restart",) if args.private_db else ())
        self.db_restarts = 0

    # --- setup ---------------------------------------------------------------------------

    def start(self) -> None:
        print(f"soak: work directory {self.work}", flush=True)
        self.broker.start()
        url = os.environ.get("TOMQUEUE_SOAK_DATABASE_URL")
        if self.args.private_db:
            server_class = (
                dbservers.PrivatePostgres
                if self.args.database == "postgresql"
                else dbservers.PrivateMariaDB
            )
            self.db_server = server_class()
            self.db_server.start()
            self.db_server.create_database()
            url = self.db_server.url()
        config = make_config(self.args.database, "amqp", self.work, amqp_url=self.broker.url)
        if url:
            config = config.replace(database_url=url)
        reset_database(config)
        self.config = config
        self.cluster = Cluster(config, self.work)
        db = make_url(config.database_url)
        self.db_proxy = TcpProxy(db.host or "127.0.0.1", db.port or _default_port(db))
        self.amqp_proxy = TcpProxy("127.0.0.1", self.broker.port)
        self.db_via_proxy = config.database_url.replace(
            f"{db.host}:{db.port}", f"127.0.0.1:{self.db_proxy.port}"
        )
        self.amqp_via_proxy = (
            self.broker.url.replace(f":{self.broker.port}/", f":{self.amqp_proxy.port}/")
            + "?heartbeat=2"
        )
        self.manager = self.cluster.deferred()
        self.workers = [self._worker() for _ in range(self.args.workers)]
        self.cluster.worker(
            "--threads",
            str(self.args.threads),
            config=config.replace(database_url=self.db_via_proxy),
        )
        self.cluster.worker(
            "--threads", str(self.args.threads), config=config.replace(amqp_url=self.amqp_via_proxy)
        )

    def _worker(self) -> Proc:
        return self.cluster.worker("--threads", str(self.args.threads))

    # --- load ----------------------------------------------------------------------------

    def produce(self) -> None:
        started = time.monotonic()
        for i in itertools.count():
            if self.stop.is_set():
                return
            pause = started + i / self.args.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            marker = f"j{next(self.counter)}"
            roll = self.rng.random()
            seconds = self.rng.uniform(1, 3) if roll < 0.08 else self.rng.uniform(0.01, 0.2)
            ahead = self.rng.uniform(1, 10) if roll > 0.98 else 0.0
            try:
                job = Delayed.enqueue(
                    fault_jobs.LedgerJob(self.ledger, marker, seconds),
                    run_at=timedelta(seconds=ahead) if ahead else None,
                    config=self.config,
                )
            except Exception as exc:  # a committed job whose enqueue raised is still due
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.refused_at.append(time.time())
                self.errors.append(
                    f"enqueue {marker} (not committed): {type(exc).__name__}: {first}"
                )
                continue
            with self.lock:
                self.due[marker] = job.run_at.replace(tzinfo=UTC).timestamp()

    # --- faults --------------------------------------------------------------------------

    def _replace(self, victim: Proc) -> None:
        index = self.workers.index(victim)
        self.workers[index] = self._worker()

    def kill9_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        victim.kill9()
        self._replace(victim)

    def term_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        victim.signal(signal.SIGTERM)
        victim.wait(30)
        self._replace(victim)

    def close_connections(self) -> None:
        pids = [p.pid for p in self.cluster.procs if p.alive()]
        self.broker.close_connections(pids, roles=("worker", "publisher", "deferred"))

    def broker_restart(self) -> None:
        self.broker.ctl("stop_app")
        self.stop.wait(3)
        self.broker.ctl("start_app")
        self.broker.wait_accepting(60)

    def kill_db_sessions(self) -> None:
        dbctl.kill_sessions(self.config)

    def kill9_manager(self) -> None:
        self.manager.kill9()
        self.manager = self.cluster.deferred()

    def _proxy_fault(self, proxy: TcpProxy, mode: str, seconds: float) -> None:
        proxy.set_mode(mode)
        self.stop.wait(seconds)
        proxy.set_mode("pass")

    def db_blackhole(self) -> None:
        self._proxy_fault(self.db_proxy, "blackhole", 5.0)

    def db_reset(self) -> None:
        self._proxy_fault(self.db_proxy, "reset", 2.0)

    def broker_blackhole(self) -> None:
        self._proxy_fault(self.amqp_proxy, "blackhole", 8.0)

    def broker_disk_alarm(self) -> None:
        self.broker.ctl("set_disk_free_limit", "100000GB")
        try:
            self.stop.wait(5.0)
        finally:
            self.broker.ctl("set_disk_free_limit", "50MB")

    def db_restart(self) -> None:
        """Alternately a clean stop and a crash with 1.5 s of outage, then a start."""
        server = self.db_server
        assert server is not None
        crash = self.db_restarts % 2 == 1
        self.db_restarts += 1
        if isinstance(server, dbservers.PrivatePostgres):
            server.stop("immediate" if crash else "fast")
        elif crash:
            server.kill9()
        else:
            assert isinstance(server, dbservers.PrivateMariaDB)
            server.shutdown()
        if crash:
            self.stop.wait(1.5)
        server.start()
        get_engine(self.config).dispose()  # the soak's own pool: every connection is dead

    def publish_failure(self) -> None:
        prefix = f"pf{next(self.counter)}-"
        proc = Proc(
            "enqueue",
            [
                "-m",
                "tests.fault_jobs",
                "enqueue",
                self.ledger,
                prefix,
                "20",
            ],
            self.cluster.env(TOMQUEUE_FAILPOINTS="enqueue.before_publish=raise"),
            self.work / "enqueue-failpoint.log",
        )
        proc.wait(60)
        now = time.time()
        with self.lock:
            for i in range(20):
                self.due[f"{prefix}{i}"] = now

    FAULTS = (
        "kill9_worker",
        "close_connections",
        "kill_db_sessions",
        "db_blackhole",
        "term_worker",
        "broker_restart",
        "kill9_manager",
        "publish_failure",
        "db_reset",
        "broker_blackhole",
        "broker_disk_alarm",
    )

    def inject(self) -> None:
        for name in itertools.cycle(self.faults_cycle):
            if self.stop.wait(self.args.fault_every):
                return
            at = time.time()
            try:
                getattr(self, name)()
            except Exception as exc:  # report and go on: the soak measures the system
                self.errors.append(f"fault {name}: {type(exc).__name__}: {exc}")
            self.faults.append((at, name))
            print(
                f"  {time.strftime('%H:%M:%S')} fault {name} ({time.time() - at:.1f}s)", flush=True
            )

    # --- run and report ------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        producer = threading.Thread(target=self.produce, daemon=True)
        injector = threading.Thread(target=self.inject, daemon=True)
        began = time.time()
        producer.start()
        injector.start()
        deadline = time.monotonic() + self.args.minutes * 60
        while time.monotonic() < deadline:
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
            print(
                f"  {time.strftime('%H:%M:%S')} enqueued {len(self.due)}, "
                f"done {len(fault_jobs.completed(self.ledger))}",
                flush=True,
            )
        self.stop.set()
        producer.join(30)
        injector.join(120)
        drain_until = time.monotonic() + self.args.drain
        while time.monotonic() < drain_until:
            with self.lock:
                wanted = set(self.due)
            if wanted <= fault_jobs.completed(self.ledger) and not rows(self.config):
                break
            time.sleep(1.0)
        return self.report(time.time() - began)

    def report(self, elapsed: float) -> int:
        with self.lock:
            due = dict(self.due)
        result = fault_jobs.check(
            self.ledger, list(due), deaths=self.cluster.deaths, exactly_once=False
        )
        starts: dict[str, list[float]] = defaultdict(list)
        for run in result.runs:
            starts[run.marker].append(run.start)
        reruns = sum(1 for m in due if len(starts.get(m, [])) > 1)
        first_ok = {r.marker: r.start for r in reversed(result.runs) if r.status == "ok"}
        longest, longest_fault = 0.0, "-"
        for at, name in self.faults:
            window = [m for m, t in due.items() if at <= t <= at + RECOVERY_WINDOW]
            late = [first_ok.get(m, time.time()) - due[m] for m in window]
            if late and max(late) > longest:
                longest = max(late)
                longest_fault = f"{name} at {time.strftime('%H:%M:%S', time.localtime(at))}"
        lateness = sorted(first_ok[m] - due[m] for m in due if m in first_ok)
        left = rows(self.config)
        faults: defaultdict[str, int] = defaultdict(int)
        for _at, name in self.faults:
            faults[name] += 1
        print()
        print(f"soak: {elapsed / 60:.1f} min on {self.args.database}, {len(due)} jobs enqueued")
        print(f"  done:        {result.done}")
        print(f"  lost:        {len(result.lost)} {result.lost[:10] if result.lost else ''}")
        print(f"  duplicated:  {len(result.duplicated)} (completed more than once)")
        for marker in list(result.duplicated)[:10]:
            first, again = [r for r in result.runs if r.marker == marker and r.status == "ok"][:2]
            print(
                f"    {marker}: ok in pid {first.pid} at {_clock(first.end)}, again in pid "
                f"{again.pid} at {_clock(again.start)}, after {self._fault_before(again.start)}"
            )
        print(f"  re-run:      {reruns} (started again after a lost lock)")
        print(f"  overlapping: {len(result.overlapping)}")
        for a, b in result.overlapping[:5]:
            print(
                f"    {a.marker}: pid {a.pid} [{a.start:.3f}, {a.end}] / "
                f"pid {b.pid} at {b.start:.3f}"
            )
        if result.unfinished:
            print(f"  unfinished runs (process alive, no end): {len(result.unfinished)}")
        if lateness:
            p50 = lateness[len(lateness) // 2]
            p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
            print(f"  lateness:    p50 {p50:.3f}s  p99 {p99:.3f}s  max {lateness[-1]:.2f}s")
        print(f"  longest recovery: {longest:.2f}s ({longest_fault})")
        print(f"  faults:      {dict(faults)}")
        print(f"  rows left in delayed_jobs: {len(left)}")
        for r in left[:5]:
            print(
                f"    job {r.id} locked_by={r.locked_by} failed_at={r.failed_at} run_at={r.run_at}"
            )
        if self.refused_at:
            after: dict[str, int] = defaultdict(int)
            for when in self.refused_at:
                after[self._fault_before(when).split(" at ")[0]] += 1
            print(f"  enqueues that raised: {len(self.refused_at)}, after: {dict(after)}")
        if self.errors:
            print(f"  errors:      {len(self.errors)} (the first 10 follow)")
        for error in self.errors[:10]:
            print(f"  error: {error}")
        return 1 if result.lost or result.overlapping else 0

    def _fault_before(self, when: float) -> str:
        before = [(at, name) for at, name in self.faults if at <= when]
        return f"{before[-1][1]} at {_clock(before[-1][0])}" if before else "no fault"

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            self.cluster.close()
        for proxy in (getattr(self, "db_proxy", None), getattr(self, "amqp_proxy", None)):
            if proxy is not None:
                proxy.close()
        close_publishers()
        with contextlib.suppress(Exception):
            delete_broker_objects(self.config)
        self.broker.stop()
        dispose_engines()
        if self.db_server is not None:
            self.db_server.close()


def _clock(when: float | None) -> str:
    if when is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"


def _default_port(url) -> int:  # type: ignore[no-untyped-def]
    return 5432 if url.get_backend_name() == "postgresql" else 3306


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--database", choices=("postgresql", "mysql"), default="postgresql")
    p.add_argument(
        "--private-db",
        action="store_true",
        help="a private database server of the soak's own, restarted and crashed among the faults",
    )
    p.add_argument("--rate", type=float, default=40.0, help="jobs enqueued per second")
    p.add_argument("--workers", type=int, default=3, help="plain workers (plus 2 proxied)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults")
    p.add_argument("--drain", type=float, default=120.0, help="longest wait for the backlog")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    soak = Soak(args)
    logging.basicConfig(  # the soak's own enqueue errors go to a file, not the report
        filename=soak.work / "soak.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        return soak.run()
    finally:
        soak.close()


if __name__ == "__main__":
    sys.exit(main())
