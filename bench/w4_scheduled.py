"""W4 scheduled: jobs due ``w4_ahead`` seconds after their enqueue, through the deferred
manager (``tomqueue deferred``) and a worker.

Lateness = the job's ``Stamp`` at ``perform`` start minus its ``run_at``. A private queue
bound to the work exchange sees when the deferred manager released each job, which splits
lateness into the release (deferred manager; negative: it publishes ``release_ahead``, 50 ms,
before ``run_at``) and release → start (worker: lock, then wait for ``run_at``). One
producer enqueues as fast as it can, so when the worker's throughput is below the enqueue
rate, lateness grows along the burst:
``start_rate_per_s`` and ``due_rate_per_s`` show it. Peak RSS of the worker and the deferred
manager is sampled with psutil. Skipped when ``deferred.manager`` cannot be imported.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pika

import tomqueue
from bench import procs
from bench.env import Target, consumers, reset, table_empty, work_queues
from bench.jobs import Noop, Stamp, read_stamps
from bench.options import Options
from bench.w3_latency import percentiles
from tomqueue.topology import Topology

SKIPPED = "W4 skipped: deferred manager not available"


def unavailable() -> str | None:
    """Why W4 cannot run (``None`` when it can)."""
    try:
        importlib.import_module("deferred.manager")
    except Exception as exc:  # ImportError, or a half-written module
        return f"{SKIPPED} ({type(exc).__name__}: {exc})"
    return None


class Spy:
    """Copies of everything published to ``<prefix>.work`` (a private queue bound with
    ``#``): when the deferred manager released each job, to split lateness in two."""

    def __init__(self, target: Target) -> None:
        self.seen: dict[int, float] = {}
        self._connection = pika.BlockingConnection(pika.URLParameters(target.amqp_url))
        channel = self._connection.channel()
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, Topology.of(target.config).work_exchange, routing_key="#")
        channel.basic_consume(queue, self._on_message, auto_ack=True)
        self._channel = channel
        self._thread = threading.Thread(target=channel.start_consuming, daemon=True)
        self._thread.start()

    def _on_message(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        job_id = json.loads(body).get("delayed_job_id")
        self.seen.setdefault(job_id, time.time())

    def close(self) -> None:
        self._connection.add_callback_threadsafe(self._channel.stop_consuming)
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._connection.close()


def enqueue_scheduled(
    target: Target, path: str, count: int, ahead: float
) -> tuple[dict[str, float], dict[str, int]]:
    """Enqueue ``count`` jobs, each due ``ahead`` seconds after its own enqueue; returns
    ({marker: due time}, {marker: job id})."""
    due: dict[str, float] = {}
    ids: dict[str, int] = {}
    for i in range(count):
        marker = str(i)
        when = time.time() + ahead
        due[marker] = when
        run_at = datetime.fromtimestamp(when, UTC).replace(tzinfo=None)
        ids[marker] = tomqueue.enqueue(Stamp(path, marker), run_at=run_at, config=target.config).id
    return due, ids


def lateness(due: dict[str, float], path: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while len(read_stamps(path)) < len(due) and time.monotonic() < deadline:
        time.sleep(0.1)
    started = {marker: t for t, marker in read_stamps(path)}
    values = [(started[m] - t) * 1000 for m, t in due.items() if m in started]
    out: dict[str, Any] = {"jobs": len(due), "missing": len(due) - len(values)}
    if values:
        out.update({f"{k}_ms": v for k, v in percentiles(values).items()})
        out["min_ms"], out["max_ms"] = min(values), max(values)
        first = min(due, key=due.__getitem__)
        out["first_job_ms"] = (started[first] - due[first]) * 1000 if first in started else None
        span = max(started.values()) - min(started.values())
        out["start_rate_per_s"] = (len(started) - 1) / span if span > 0 else None
        out["due_rate_per_s"] = (len(due) - 1) / (max(due.values()) - min(due.values()) or 1)
    return out


def split(
    due: dict[str, float], ids: dict[str, int], released: dict[int, float], path: str
) -> dict[str, Any]:
    """Lateness of the release (deferred manager) and from release to start (worker)."""
    started = {marker: t for t, marker in read_stamps(path)}
    release = [(released[ids[m]] - t) * 1000 for m, t in due.items() if ids[m] in released]
    run = [
        (started[m] - released[ids[m]]) * 1000 for m in due if m in started and ids[m] in released
    ]
    out: dict[str, Any] = {}
    if release:
        out["release"] = {f"{k}_ms": v for k, v in percentiles(release).items()}
    if run:
        out["release_to_start"] = {f"{k}_ms": v for k, v in percentiles(run).items()}
    return out


def start_processes(target: Target, opts: Options, tag: str) -> tuple[procs.Proc, procs.Proc]:
    worker = procs.tomqueue_worker(target, opts.threads, False, f"w4-{tag}")
    manager = procs.deferred_manager(target, f"w4-{tag}")
    deferred_queue = Topology.of(target.config).deferred_queue
    work_queue = work_queues(target)[1]
    procs.wait_until(lambda: consumers(target, work_queue) > 0, 30, "the worker to consume", 0.1)
    procs.wait_until(
        lambda: consumers(target, deferred_queue) > 0 or not manager.running(),
        30,
        "the deferred manager to consume",
        0.1,
    )
    if not manager.running():
        raise RuntimeError(f"the deferred manager exited; see {manager.log_path}")
    warm_up(target, 2 * opts.threads)
    return worker, manager


def warm_up(target: Target, count: int) -> None:
    """A few immediate jobs first, so the worker's connections and threads exist (a worker
    that has been running for a while has them)."""
    for _ in range(count):
        tomqueue.enqueue(Noop(), config=target.config)
    procs.wait_until(lambda: table_empty(target), 30, "the warm-up jobs", 0.02)


def measure(target: Target, opts: Options, count: int) -> dict[str, Any]:
    reset(target)
    path = str(target.path(f"w4-{count}.stamps"))
    worker, manager = start_processes(target, opts, str(count))
    spy = Spy(target)
    try:
        started = time.monotonic()
        due, ids = enqueue_scheduled(target, path, count, opts.sizes.w4_ahead)
        enqueue_s = time.monotonic() - started
        result = lateness(due, path, timeout=opts.sizes.w4_ahead + 60 + count / 50)
        result.update(split(due, ids, spy.seen, path))
    finally:
        spy.close()
        for proc in (worker, manager):
            proc.stop()
            proc.close()
    return {
        **result,
        "enqueue_seconds": enqueue_s,
        "peak_rss_mb": {"worker": worker.peak_rss / 2**20, "deferred": manager.peak_rss / 2**20},
    }


def run(target: Target, opts: Options) -> dict[str, Any]:
    why = unavailable()
    if why:
        return {"skipped": why}
    out: dict[str, Any] = {"ahead_s": opts.sizes.w4_ahead, "threads": opts.threads}
    for count in opts.sizes.w4_counts:
        out[str(count)] = measure(target, opts, count)
    reset(target)
    return out
