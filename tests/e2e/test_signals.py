"""Must-show 9 and the signal contract, with real ``tomqueue worker`` processes.

- TERM during a short job: the job finishes, the worker exits 0.
- ``-n 2``: TERM to the supervisor, or INT to the whole process group (a terminal's Ctrl-C),
  lets the running jobs finish and exits 0.
- A job longer than ``stop_grace`` is stopped and released (unlocked, attempt not counted,
  re-notified) so it runs again promptly; the worker still exits 0.
- A second signal exits at once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
from sqlalchemy import select, text

import tomqueue
from tests import ledger
from tests.conftest import (
    Stack,
    WorkerProcess,
    all_queue_names,
    declare_topology,
    drain_queue,
    job_count,
    on_stacks,
    queue_depth,
    wait_until,
    worker_env,
)
from tests.jobs import Blocked, Record, Sleepy
from tomqueue.db import get_engine
from tomqueue.message import decode
from tomqueue.schema import Job

STACKS = (("sqlite", "polling"), ("postgresql", "amqp"), ("mysql", "amqp"))


def start_worker(
    stack: Stack, tmp_path: Path, procs: list[WorkerProcess], *args: str, **env: str
) -> WorkerProcess:
    if stack.transport == "amqp":
        declare_topology(stack.config)
    worker = WorkerProcess(
        ["--import", "tests.jobs", *args],
        worker_env(stack.config, **env),
        tmp_path / f"worker{len(procs)}.log",
    )
    procs.append(worker)
    return worker


def registered_workers(config: tomqueue.Config) -> int:
    with get_engine(config).connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM tomqueue_workers")).scalar_one())


def assert_queues_empty(stack: Stack) -> None:
    if stack.transport == "amqp":
        for name in all_queue_names(stack.config):
            assert queue_depth(stack.config, name)[0] == 0, name


@on_stacks(*STACKS)
def test_term_during_a_short_job_finishes_it_and_exits_0(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    tomqueue.enqueue(Sleepy(ledger_path, "short", seconds=1.5))
    worker = start_worker(stack, tmp_path, worker_processes)
    wait_until(lambda: ledger.counts(ledger_path, "start")["short"], 30, "the job to start")

    worker.send(signal.SIGTERM)
    code = worker.wait(20)

    assert code == 0, worker.log()[-3000:]
    assert ledger.counts(ledger_path) == {"short": 1}, "the running job did not finish"
    assert job_count(stack.config) == 0
    assert_queues_empty(stack)
    assert "Traceback" not in worker.log()


@on_stacks(("postgresql", "amqp"), ("sqlite", "polling"))
def test_term_to_supervisor_lets_children_finish(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    for i in range(2):
        tomqueue.enqueue(Sleepy(ledger_path, f"s{i}", seconds=1.5))
    worker = start_worker(stack, tmp_path, worker_processes, "-n", "2", "--threads", "2")
    wait_until(lambda: len(ledger.counts(ledger_path, "start")) == 2, 30, "both jobs started")
    wait_until(lambda: registered_workers(stack.config) == 2, 30, "both children running")

    worker.send(signal.SIGTERM)
    code = worker.wait(20)

    assert code == 0, worker.log()[-3000:]
    assert ledger.counts(ledger_path) == {"s0": 1, "s1": 1}
    assert job_count(stack.config) == 0
    assert_queues_empty(stack)


@on_stacks(("postgresql", "amqp"))
def test_ctrl_c_to_the_process_group_is_one_signal(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    """A terminal's Ctrl-C sends INT to the whole foreground group: the children must not
    see it twice (which would mean "exit at once" and kill the running jobs)."""
    for i in range(2):
        tomqueue.enqueue(Sleepy(ledger_path, f"c{i}", seconds=1.5))
    worker = start_worker(stack, tmp_path, worker_processes, "-n", "2", "--threads", "2")
    wait_until(lambda: len(ledger.counts(ledger_path, "start")) == 2, 30, "both jobs started")
    wait_until(lambda: registered_workers(stack.config) == 2, 30, "both children running")

    worker.send_group(signal.SIGINT)
    code = worker.wait(20)

    assert code == 0, worker.log()[-3000:]
    assert ledger.counts(ledger_path) == {"c0": 1, "c1": 1}
    assert job_count(stack.config) == 0


@on_stacks(("sqlite", "polling"), ("postgresql", "amqp"))
def test_job_longer_than_stop_grace_is_released_not_failed(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    job = tomqueue.enqueue(Sleepy(ledger_path, "long", seconds=60))
    worker = start_worker(stack, tmp_path, worker_processes, TOMQUEUE_STOP_GRACE="1")
    wait_until(lambda: ledger.counts(ledger_path, "start")["long"], 30, "the job to start")

    started = time.monotonic()
    worker.send(signal.SIGTERM)
    code = worker.wait(20)

    assert code == 0, worker.log()[-3000:]
    assert time.monotonic() - started < 10
    with get_engine(stack.config).connect() as conn:
        row = conn.execute(select(Job.__table__).where(Job.id == job.id)).first()
    assert row is not None
    assert row.locked_at is None and row.locked_by is None, "the lock was not released"
    assert row.attempts == 0 and row.failed_at is None, "a stop is not a failed attempt"
    assert row.version == job.version + 1
    assert ledger.counts(ledger_path) == {}
    if stack.transport == "amqp":  # re-notified so another worker runs it promptly
        notes = [
            decode(b, h)
            for b, h in drain_queue(stack.config, f"{stack.config.prefix}.balance.normal")
        ]
        assert [(n.job_id, n.version) for n in notes] == [(job.id, job.version + 1)]


@on_stacks(("postgresql", "amqp"))
def test_jobs_stuck_in_one_call_do_not_hold_up_the_exit(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    """Three jobs blocked in C past ``stop_grace`` + ``timeout_grace``: their threads are
    abandoned (attempt counted, rows kept locked: the process may still run them) and the
    worker exits after one shared wait for its threads, not one per stuck thread."""
    jobs = [tomqueue.enqueue(Blocked(ledger_path, f"b{i}")) for i in range(3)]
    grace = {"TOMQUEUE_STOP_GRACE": "1", "TOMQUEUE_TIMEOUT_GRACE": "1"}
    worker = start_worker(stack, tmp_path, worker_processes, "--threads", "3", **grace)
    wait_until(lambda: len(ledger.counts(ledger_path, "start")) == 3, 30, "the jobs to start")

    started = time.monotonic()
    worker.send(signal.SIGTERM)
    code = worker.wait(60)
    took = time.monotonic() - started

    assert code == 0, worker.log()[-3000:]
    # grace 1 s + timeout grace 1 s + one 5 s wait for every thread; 5 s per stuck thread
    # (17 s here) before the threads shared the wait
    assert took < 12, f"the worker took {took:.1f} s to exit"
    with get_engine(stack.config).connect() as conn:
        rows = conn.execute(select(Job.__table__).where(Job.id.in_([j.id for j in jobs]))).all()
    assert len(rows) == 3
    for row in rows:
        assert row.locked_by is not None, "an abandoned job must stay locked"
        assert row.attempts == 1
    assert worker.log().count("a job thread ignored its interruption") == 3


@on_stacks(("postgresql", "amqp"))
def test_second_signal_exits_at_once(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    tomqueue.enqueue(Sleepy(ledger_path, "long", seconds=60))
    worker = start_worker(stack, tmp_path, worker_processes)
    wait_until(lambda: ledger.counts(ledger_path, "start")["long"], 30, "the job to start")

    worker.send(signal.SIGTERM)
    time.sleep(0.3)  # two distinct deliveries of the signal, as an operator would send them
    started = time.monotonic()
    worker.send(signal.SIGTERM)
    code = worker.wait(10)

    assert code != 0
    assert time.monotonic() - started < 3
    assert ledger.counts(ledger_path) == {}


@on_stacks(("postgresql", "amqp"))
def test_idle_worker_picks_up_new_jobs_then_stops_on_term(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    """A long-running worker (no --exit-on-complete) takes jobs enqueued while it waits."""
    worker = start_worker(stack, tmp_path, worker_processes)
    normal = f"{stack.config.prefix}.balance.normal"
    wait_until(lambda: queue_depth(stack.config, normal)[1] == 1, 30, "the worker consuming")
    for i in range(3):
        tomqueue.enqueue(Record(ledger_path, f"r{i}"))
        wait_until(lambda i=i: ledger.counts(ledger_path)[f"r{i}"], 15, f"job r{i}")
    worker.send(signal.SIGTERM)
    assert worker.wait(20) == 0


@on_stacks(("postgresql", "amqp"))
def test_term_while_a_restarted_child_starts_exits_0(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    worker = start_worker(stack, tmp_path, worker_processes, "-n", "2")
    wait_until(lambda: registered_workers(stack.config) == 2, 30, "both children running")
    tomqueue.enqueue(Sleepy(ledger_path, "busy", seconds=2))
    wait_until(lambda: ledger.counts(ledger_path, "start")["busy"], 30, "the job to start")
    supervisor = psutil.Process(worker.pid)
    busy_pid = ledger.read(ledger_path)[0].pid
    idle = [c for c in supervisor.children() if c.pid != busy_pid]
    assert len(idle) == 1
    idle[0].kill()  # the supervisor restarts it
    wait_until(
        lambda: any(c.pid not in (busy_pid, idle[0].pid) for c in supervisor.children()),
        10,
        "a restarted child",
        interval=0.01,
    )

    worker.send(signal.SIGTERM)

    assert worker.wait(10) == 0, worker.log()[-3000:]
    assert ledger.counts(ledger_path) == {"busy": 1}
