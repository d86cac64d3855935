"""W1 throughput: enqueue N no-op jobs, then one worker process drains them.

Ours: ``tomqueue.enqueue`` one by one — each call returns once its row is committed and its
notification handed to the background publisher; ``enqueue/s`` is timed until the last call
returns, ``enqueue+flush/s`` until ``tomqueue.flush()`` says every notification is
confirmed — then a ``tomqueue worker --threads N --exit-on-complete`` subprocess;
processed/s is measured from its start until the table is empty. ``sync_publish`` (enqueue
waits for its own confirm) is measured on ``SYNC_JOBS`` jobs. Baseline: Delayed::Job-style
one-INSERT-per-job enqueue, then ``python -m bench.dj_baseline --threads N --exit-on-empty``.
When tomqueue has ``enqueue_many``, its rate (batches of ``BULK_BATCH``) is reported too.
Floor: ``FLOOR_JOBS`` of ``enqueue``'s INSERTs alone, one by one (``insert_one``, a durable
commit each, no validation, no notification, no broker): the most one producer calling
``enqueue`` could reach on this host at this hour.
"""

from __future__ import annotations

import time
from typing import Any

import tomqueue
from bench import dj_baseline, procs
from bench.env import Target, count_jobs, reset, table_empty
from bench.jobs import Noop
from bench.options import Options
from bench.w3_latency import percentiles
from tomqueue import handler as handlers
from tomqueue import persist
from tomqueue.db import get_autocommit_engine
from tomqueue.enqueue import new_job, validate
from tomqueue.persist import row_values

BULK_BATCH = 1000
SYNC_JOBS = 2000
FLOOR_JOBS = 5000
FLUSH_TIMEOUT = 120.0


def flushed(started: float) -> float:
    """Seconds from ``started`` until every notification handed off is confirmed."""
    if not tomqueue.flush(FLUSH_TIMEOUT):
        raise RuntimeError("notifications were not confirmed (see the ERROR log lines)")
    return time.perf_counter() - started


def enqueue_ours(
    target: Target, count: int, sync: bool = False
) -> tuple[float, float, list[float]]:
    """Seconds to enqueue ``count`` jobs with ``tomqueue.enqueue`` (the first one also opens
    the broker connection): until the last call returned, and until all are confirmed; and
    each call's milliseconds (the long tail with a broker is the producer and the database
    waiting for a core while RabbitMQ works: bench/README.md)."""
    config = target.config.replace(sync_publish=sync)
    calls: list[float] = []
    clock = time.perf_counter
    started = clock()
    for _ in range(count):
        before = clock()
        tomqueue.enqueue(Noop(), config=config)
        calls.append((clock() - before) * 1000)
    returned = clock() - started
    return returned, flushed(started), calls


def enqueue_ours_sync(target: Target, count: int) -> dict[str, Any]:
    """``sync_publish=True``: each enqueue waits for its own confirm (the old behaviour)."""
    reset(target)
    n = min(count, SYNC_JOBS)
    seconds, _, _ = enqueue_ours(target, n, sync=True)
    reset(target)
    return {"jobs": n, "enqueue_per_s": n / seconds, "enqueue_seconds": seconds}


def enqueue_floor(target: Target, count: int) -> dict[str, Any]:
    """The ceiling of ``enqueue`` one by one: its INSERT alone (``insert_one`` on a kept
    autocommit connection, a durable commit each), the row's values built once, no broker."""
    reset(target)
    n = min(count, FLOOR_JOBS)
    engine = get_autocommit_engine(target.config)
    values = row_values(new_job(validate(Noop(), 0, None, None, target.config)))
    started = time.perf_counter()
    for _ in range(n):
        persist._insert_autocommit(engine, values)  # enqueue's own INSERT step
    seconds = time.perf_counter() - started
    stored = count_jobs(target)
    if stored != n:
        raise RuntimeError(f"the floor's INSERTs stored {stored} of {n} rows")
    reset(target)
    return {"jobs": n, "enqueue_per_s": n / seconds, "enqueue_seconds": seconds}


def enqueue_ours_bulk(target: Target, count: int) -> dict[str, Any]:
    """``tomqueue.enqueue_many`` in batches of ``BULK_BATCH`` (when the library has it)."""
    many = getattr(tomqueue, "enqueue_many", None)
    if many is None:
        return {"available": False, "note": "tomqueue has no enqueue_many yet"}
    started = time.perf_counter()
    for first in range(0, count, BULK_BATCH):
        many([Noop() for _ in range(min(BULK_BATCH, count - first))], config=target.config)
    seconds = time.perf_counter() - started
    confirmed = flushed(started)
    stored = count_jobs(target)
    if stored != count:
        raise RuntimeError(f"enqueue_many stored {stored} of {count} jobs")
    return {
        "available": True,
        "batch": BULK_BATCH,
        "enqueue_per_s": count / seconds,
        "enqueue_seconds": seconds,
        "enqueue_flush_per_s": count / confirmed,
        "note": f"enqueue_many, batches of {BULK_BATCH}",
    }


def enqueue_baseline(target: Target, count: int) -> float:
    engine = dj_baseline.make_baseline_engine(target.url, 1)
    text = handlers.dump(Noop())
    started = time.perf_counter()
    for _ in range(count):
        dj_baseline.enqueue(engine, text)
    seconds = time.perf_counter() - started
    engine.dispose()
    return seconds


def drain(target: Target, proc: procs.Proc, timeout: float) -> float:
    """Seconds from the process start until the table is empty."""
    procs.wait_until(
        lambda: table_empty(target) or not proc.running(), timeout, "an empty table", interval=0.05
    )
    seconds = time.monotonic() - proc.started
    proc.wait(60)
    if not table_empty(target):
        raise RuntimeError(f"{proc.name} exited with jobs left; see {proc.log_path}")
    return seconds


def run_ours(target: Target, opts: Options) -> dict[str, Any]:
    n = opts.sizes.w1_jobs
    sync = enqueue_ours_sync(target, n)
    reset(target)
    enqueue_s, confirmed_s, calls = enqueue_ours(target, n)
    worker = procs.tomqueue_worker(target, opts.threads, True, "w1", profile=opts.profile)
    try:
        drain_s = drain(target, worker, timeout=max(120.0, n / 20))
    finally:
        worker.kill()
        worker.close()
    out = {
        "enqueue_per_s": n / enqueue_s,
        "enqueue_seconds": enqueue_s,
        "enqueue_flush_per_s": n / confirmed_s,
        "enqueue_flush_seconds": confirmed_s,
        "enqueue_call_ms": {**percentiles(calls, (50, 99)), "max": max(calls)},
        "sync": sync,
        "processed_per_s": n / drain_s,
        "drain_seconds": drain_s,
        "peak_rss_mb": worker.peak_rss / 2**20,
    }
    reset(target)
    out["bulk"] = enqueue_ours_bulk(target, n)
    out["floor"] = enqueue_floor(target, n)
    return out


def run_baseline(target: Target, opts: Options) -> dict[str, Any]:
    n = opts.sizes.w1_jobs
    reset(target)
    enqueue_s = enqueue_baseline(target, n)
    proc = procs.dj_baseline(
        target,
        opts.baseline_threads,
        "w1",
        "--exit-on-empty",
        "--sleep",
        str(opts.sizes.dj_fast_sleep),
    )
    try:
        drain_s = drain(target, proc, timeout=max(120.0, n / 20))
        summary = proc.summary()
    finally:
        proc.kill()
        proc.close()
    return {
        "enqueue_per_s": n / enqueue_s,
        "enqueue_seconds": enqueue_s,
        "processed_per_s": n / drain_s,
        "drain_seconds": drain_s,
        "peak_rss_mb": proc.peak_rss / 2**20,
        "errors": summary.get("errors"),
    }


def run(target: Target, opts: Options) -> dict[str, Any]:
    ours = run_ours(target, opts)
    baseline = run_baseline(target, opts)
    return {
        "jobs": opts.sizes.w1_jobs,
        "threads": opts.threads,
        "baseline_threads": opts.baseline_threads,
        "ours": ours,
        "baseline": baseline,
        "ratio_processed": ours["processed_per_s"] / baseline["processed_per_s"],
        "ratio_enqueue": ours["enqueue_per_s"] / baseline["enqueue_per_s"],
    }
