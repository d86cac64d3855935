"""Celery and Dramatiq as reference points for W1, when they are installed.

``pip install -e '.[bench]'`` installs both (the suite itself installs nothing). Each runs
W1's shape on the benchmark's RabbitMQ, without a database: one producer enqueues
``--w1-jobs`` no-op jobs with the library's normal API (``task.delay()``, ``actor.send()``:
enqueue/s), then ONE worker process of that library with ``--threads`` threads drains them.
processed/s runs from the worker's ``Popen`` to the time the last job recorded in the ledger
(``bench.ref_ledger``), start-up included, as for our worker. The queue
``<prefix>.ref.<name>`` (and what the library declares beside it) is private to the run and
deleted at the end; the worker runs in its own session and its process group is killed.

``run_w1`` is library-agnostic: a ``Reference`` says how to publish, which worker command to
start and which broker objects to delete (``tests/integration/test_bench_references.py``
drives it with a plain pika worker, so it is tested where neither library is installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

from bench import procs, ref_ledger
from bench.env import Target, channel
from bench.options import Options

CANDIDATES = ("celery", "dramatiq")
STOP_TIMEOUT = 20.0  # seconds a reference worker gets to exit after SIGTERM, then SIGKILL

Producer = tuple[Callable[[], object], Callable[[], object]]
"""``(send one no-op job, close the producer's connections)``."""


class Reference:
    """One library: how to publish, which worker to start, what to delete afterwards."""

    name = ""
    label = ""

    def available(self) -> bool:
        return importlib.util.find_spec(self.name) is not None

    def version(self) -> str:
        try:
            return metadata.version(self.name)
        except metadata.PackageNotFoundError:
            return "-"

    def settings(self, threads: int) -> dict[str, Any]:
        raise NotImplementedError

    def producer(self, url: str, queue: str) -> Producer:
        raise NotImplementedError

    def worker_argv(self, threads: int, queue: str) -> list[str]:
        raise NotImplementedError

    def queues(self, queue: str) -> list[str]:
        return [queue]

    def exchanges(self, queue: str) -> list[str]:
        return []


class Celery(Reference):
    name = "celery"
    label = "Celery"

    def settings(self, threads: int) -> dict[str, Any]:
        return {
            "producer": "noop.delay(); kombu + py-amqp; no publisher confirms (Celery's default)",
            "worker": " ".join(self.worker_argv(threads, "<queue>")[2:]),
            "acks": "early (acks_late=False, the default): acked when the pool takes the task",
            "prefetch": f"worker_prefetch_multiplier 4 (default) x {threads} = {4 * threads}",
            "results": "no result backend (the default)",
            "changed": (
                "private queue + direct exchange; worker_enable_remote_control=False; "
                "--without-gossip --without-mingle --without-heartbeat"
            ),
        }

    def producer(self, url: str, queue: str) -> Producer:
        from bench import ref_celery

        app, noop = ref_celery.make_app(url, queue)
        return noop.delay, app.close

    def worker_argv(self, threads: int, queue: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.ref_celery",
            "worker",
            "-P",
            "threads",
            "-c",
            str(threads),
            "-Q",
            queue,
            "-n",
            f"{queue}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
        ]

    def exchanges(self, queue: str) -> list[str]:
        return [queue]


class Dramatiq(Reference):
    name = "dramatiq"
    label = "Dramatiq"

    def settings(self, threads: int) -> dict[str, Any]:
        return {
            "producer": "noop.send(); RabbitmqBroker on pika; confirm_delivery=False (default)",
            "worker": " ".join(self.worker_argv(threads, "<queue>")[2:]),
            "acks": "after the actor ran (Dramatiq's only mode)",
            "prefetch": f"2 x threads = {2 * threads} (default)",
            "results": "no results middleware; default middleware",
            "changed": "private queue (Dramatiq adds <queue>.DQ and <queue>.XQ)",
        }

    def producer(self, url: str, queue: str) -> Producer:
        from bench import ref_dramatiq

        broker, noop = ref_dramatiq.make(url, queue)
        return noop.send, broker.close

    def worker_argv(self, threads: int, queue: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dramatiq",
            "bench.ref_dramatiq",
            "--processes",
            "1",
            "--threads",
            str(threads),
            "--queues",
            queue,
        ]

    def queues(self, queue: str) -> list[str]:
        return [queue, f"{queue}.DQ", f"{queue}.XQ"]


REFERENCES: dict[str, Reference] = {"celery": Celery(), "dramatiq": Dramatiq()}


def detect() -> dict[str, Any]:
    """``{name: {"importable": bool, "version": ..., "note": ...}}`` for each candidate."""
    out: dict[str, Any] = {}
    for name in CANDIDATES:
        ref = REFERENCES[name]
        found = ref.available()
        out[name] = {
            "importable": found,
            "version": ref.version() if found else None,
            "note": (
                "importable: runs beside W1 on the first database"
                if found
                else "not installed (pip install -e '.[bench]'): skipped"
            ),
        }
    return out


def mark_not_run(found: dict[str, Any], why: str) -> None:
    """Say in the notes why an importable reference has no W1 result."""
    for entry in found.values():
        if entry["importable"] and "W1" not in entry:
            entry["note"] = f"importable, not run ({why})"


def run(target: Target, opts: Options, found: dict[str, Any]) -> None:
    """W1 on every importable reference; results go into ``found[name]`` (``detect()``)."""
    for name, entry in found.items():
        if not entry["importable"]:
            continue
        ref = REFERENCES[name]
        started = time.monotonic()
        print(f"[{target.name}] W1 reference {ref.label} {entry['version']} ...", flush=True)
        entry["database"] = target.name
        try:
            entry["W1"] = run_w1(ref, target, opts.sizes.w1_jobs, opts.threads)
            w1 = entry["W1"]
            entry["note"] = (
                f"{ref.label} {entry['version']}, W1 on RabbitMQ beside {target.name}: "
                f"enqueue {w1['enqueue_per_s']:,.0f}/s, processed {w1['processed_per_s']:,.0f}/s "
                f"(1 worker process, {opts.threads} threads)"
            )
        except Exception as exc:
            traceback.print_exc()
            entry["W1"] = {"error": f"{type(exc).__name__}: {exc}"}
            entry["note"] = f"{ref.label}: W1 failed: {entry['W1']['error']}"
        seconds = time.monotonic() - started
        print(f"[{target.name}] W1 reference {ref.label} done in {seconds:.0f}s", flush=True)


def run_w1(
    ref: Reference, target: Target, jobs: int, threads: int, timeout: float | None = None
) -> dict[str, Any]:
    """Enqueue ``jobs`` no-op jobs through ``ref``, then time one worker draining them."""
    queue = f"{target.prefix}.ref.{ref.name}"
    ledger = target.path(f"ref-{ref.name}-w1.ledger")
    ledger.unlink(missing_ok=True)
    delete_objects(target, ref, queue)  # left over by an interrupted run
    worker: procs.Proc | None = None
    try:
        send, close = ref.producer(target.amqp_url, queue)
        try:
            started = time.perf_counter()
            for _ in range(jobs):
                send()
            enqueue_s = time.perf_counter() - started
        finally:
            close()
        # no publisher confirms: wait until the broker holds them all before the worker starts
        procs.wait_until(
            lambda: ready(target, queue) >= jobs, 30, f"{jobs} messages in {queue}", 0.05
        )
        env = target.env(
            **{
                ref_ledger.URL_ENV: target.amqp_url,
                ref_ledger.QUEUE_ENV: queue,
                ref_ledger.LEDGER_ENV: str(ledger),
            }
        )
        worker = procs.Proc(
            f"ref-{ref.name}-w1",
            ref.worker_argv(threads, queue),
            env,
            target.path(f"ref-{ref.name}-w1.log"),
            tree=True,
        )
        running = worker
        procs.wait_until(
            lambda: ref_ledger.count(ledger) >= jobs or not running.running(),
            timeout or max(120.0, jobs / 20),
            f"{jobs} jobs recorded by {worker.name}",
        )
        if ref_ledger.count(ledger) < jobs:
            raise RuntimeError(
                f"{worker.name} exited (code {worker.proc.returncode}) after "
                f"{ref_ledger.count(ledger)} of {jobs} jobs; see {worker.log_path}"
            )
        times = ref_ledger.times(ledger)
        left_ready = ready(target, queue)
        graceful = stop(worker)
        after_stop = ready(target, queue)
        return summarize(ref, jobs, threads, enqueue_s, worker, times) | {
            "queue": queue,
            "left_ready": left_ready,
            "requeued_after_stop": after_stop - left_ready,
            "duplicates": ref_ledger.count(ledger) - jobs,
            "stopped_gracefully": graceful,
            "log": str(worker.log_path),
        }
    finally:
        if worker is not None:
            kill_group(worker)
        delete_objects(target, ref, queue)


def summarize(
    ref: Reference,
    jobs: int,
    threads: int,
    enqueue_s: float,
    worker: procs.Proc,
    times: list[float],
) -> dict[str, Any]:
    first, last = min(times), max(times)
    drain_s = last - worker.started_wall
    return {
        "library": ref.name,
        "version": ref.version(),
        "jobs": jobs,
        "threads": threads,
        "enqueue_per_s": jobs / enqueue_s,
        "enqueue_seconds": enqueue_s,
        "processed_per_s": jobs / drain_s,
        "drain_seconds": drain_s,
        "first_job_after_s": first - worker.started_wall,
        "steady_per_s": (len(times) - 1) / (last - first) if last > first else None,
        "peak_rss_mb": worker.peak_rss / 2**20,
        "settings": ref.settings(threads),
    }


def ready(target: Target, queue: str) -> int:
    """Messages ready in ``queue`` (``queue.declare`` does not count unacked ones)."""
    with channel(target) as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


def stop(worker: procs.Proc) -> bool:
    """SIGTERM, then SIGKILL to the group after ``STOP_TIMEOUT``: True if it exited by itself."""
    try:
        worker.stop(STOP_TIMEOUT)
    except RuntimeError:  # Proc.wait killed the group
        return False
    return True


def kill_group(worker: procs.Proc) -> None:
    """SIGKILL the worker's whole process group, even if its leader already exited (a
    supervisor's children would keep the group alive), then reap the leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.kill()
    worker.close()


def delete_objects(target: Target, ref: Reference, queue: str) -> None:
    with channel(target) as ch:
        for name in ref.queues(queue):
            ch.queue_delete(name)
        for name in ref.exchanges(queue):
            ch.exchange_delete(name)
