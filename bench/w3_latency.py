"""W3 latency: an idle worker, one job every ``w3_interval`` for ``w3_seconds``.

Latency = the job's ``Stamp`` at ``perform`` start minus the time recorded just before the
enqueue call. Ours: ``tomqueue.enqueue`` (autocommit INSERT, hand-off to the background
publisher, which publishes with confirms) to a ``tomqueue worker`` waiting on RabbitMQ.
Floor: ``bench/w3_floor.py``, the same chain with none of our code (two durable commits and
RabbitMQ's hop). Baseline: a one-INSERT enqueue to a polling ``bench.dj_baseline`` sleeping
``dj_fast_sleep`` between empty polls (and, with ``--large``, Delayed::Job's default
``sleep_delay`` of 5 s; otherwise that is reported as a note).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomqueue
from bench import dj_baseline, procs, w3_floor
from bench.env import Target, consumers, reset, work_queues
from bench.jobs import Stamp, read_stamps
from bench.options import Options
from tomqueue import handler as handlers

IDLE_THREADS = 1


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles, in the unit of ``values``."""
    ordered = sorted(values)
    out = {}
    for p in points:
        rank = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        out[f"p{p}"] = ordered[rank]
    return out


def paced(
    count: int, interval: float, send: Callable[[str], None]
) -> tuple[dict[str, float], list[float]]:
    """Call ``send(marker)`` every ``interval`` seconds; returns ({marker: time before
    send}, [milliseconds each send took])."""
    sent: dict[str, float] = {}
    took: list[float] = []
    start = time.monotonic()
    for i in range(count):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        marker = str(i)
        sent[marker] = time.time()
        send(marker)
        took.append((time.time() - sent[marker]) * 1000)
    return sent, took


def latencies(
    sent: dict[str, float], took: list[float], stamps_path: str, timeout: float
) -> dict[str, Any]:
    """Wait for every job to start; enqueue→start percentiles in milliseconds (and how long
    the enqueue call itself took, which is part of it)."""
    with contextlib.suppress(RuntimeError):  # jobs that never started are reported missing
        procs.wait_until(
            lambda: len(read_stamps(stamps_path)) >= len(sent), timeout, "every job to start", 0.1
        )
    started = {marker: t for t, marker in read_stamps(stamps_path)}
    values = [(started[m] - t) * 1000 for m, t in sent.items() if m in started]
    result: dict[str, Any] = {"jobs": len(sent), "missing": len(sent) - len(values)}
    if values:
        result.update({f"{k}_ms": v for k, v in percentiles(values).items()})
        result["max_ms"] = max(values)
        result["enqueue_call_p50_ms"] = percentiles(took, (50,))["p50"]
    return result


def run_ours(target: Target, opts: Options) -> dict[str, Any]:
    reset(target)
    path = str(target.path("w3-ours.stamps"))
    worker = procs.tomqueue_worker(target, IDLE_THREADS, False, "w3")
    queue = work_queues(target)[1]  # normal: where priority 0 goes
    try:
        procs.wait_until(lambda: consumers(target, queue) > 0, 30, "the worker to consume", 0.1)
        tomqueue.enqueue(Stamp(path, "warmup"), config=target.config)  # connections warm
        procs.wait_until(lambda: read_stamps(path), 30, "the warm-up job", 0.05)
        Path(path).unlink()
        count = int(opts.sizes.w3_seconds / opts.sizes.w3_interval)

        def send(marker: str) -> None:
            tomqueue.enqueue(Stamp(path, marker), config=target.config)

        sent, took = paced(count, opts.sizes.w3_interval, send)
        result = latencies(sent, took, path, timeout=30)
    finally:
        worker.stop()
        worker.close()
    return result


def run_floor(target: Target, opts: Options) -> dict[str, Any]:
    """The same pacing through the bare chain (``bench/w3_floor.py``): the host's floor."""

    def send_jobs(send: Callable[[str], None], path: str) -> dict[str, Any]:
        count = int(opts.sizes.w3_seconds / opts.sizes.w3_interval)
        sent, took = paced(count, opts.sizes.w3_interval, send)
        return latencies(sent, took, path, timeout=30)

    return w3_floor.run(target, opts, send_jobs)


def run_baseline(target: Target, opts: Options, sleep: float, tag: str) -> dict[str, Any]:
    reset(target)
    path = str(target.path(f"w3-{tag}.stamps"))
    ready = target.path(f"w3-{tag}.ready")
    ready.unlink(missing_ok=True)
    proc = procs.dj_baseline(
        target, IDLE_THREADS, f"w3-{tag}", "--sleep", str(sleep), "--ready-file", str(ready)
    )
    engine = dj_baseline.make_baseline_engine(target.url, 1)
    try:
        procs.wait_until(ready.exists, 30, "the baseline to start", 0.05)
        count = int(opts.sizes.w3_seconds / opts.sizes.w3_interval)
        sent, took = paced(
            count,
            opts.sizes.w3_interval,
            lambda m: dj_baseline.enqueue(engine, handlers.dump(Stamp(path, m))),
        )
        result = latencies(sent, took, path, timeout=sleep * 2 + 30)
    finally:
        proc.stop()
        proc.close()
        engine.dispose()
    return {**result, "sleep": sleep}


def dj_default_note(sleep: float) -> str:
    return (
        f"Delayed::Job's default sleep_delay={sleep:g}s: an idle worker finds a new job after "
        f"a uniform 0-{sleep:g}s wait, so p50 ≈ {sleep / 2 * 1000:.0f} ms and "
        f"p99 ≈ {sleep * 0.99 * 1000:.0f} ms (run with --large to measure it)"
    )


def run(target: Target, opts: Options) -> dict[str, Any]:
    sizes = opts.sizes
    out: dict[str, Any] = {
        "interval_ms": sizes.w3_interval * 1000,
        "seconds": sizes.w3_seconds,
        "ours": run_ours(target, opts),
        "floor": run_floor(target, opts),
        "baseline": run_baseline(target, opts, sizes.dj_fast_sleep, "baseline"),
    }
    if sizes.measure_dj_default_sleep:
        out["baseline_default_sleep"] = run_baseline(
            target, opts, sizes.dj_default_sleep, "baseline-default"
        )
    else:
        out["baseline_default_sleep_note"] = dj_default_note(sizes.dj_default_sleep)
    reset(target)
    return out
