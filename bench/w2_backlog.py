"""W2 backlog: does reserving a job get slower as the table grows?

For each shape (ready / future / failed) and size, the backlog is loaded in bulk; then the
time per job to reserve + run + complete the next ``batch`` ready jobs is measured, from
the ``Stamp`` each job writes when it starts, over the middle 80 % of the starts, so process
start-up, the publishing of notifications and the last stragglers are not counted. With
``--repeat N`` each measurement runs N times and the median counts. For the ``ready`` shape
the backlog itself is what runs; for ``future`` and ``failed``, ``batch`` due jobs are added
on top.

Ours: notifications for exactly those jobs are published (built from the rows, as
``tomqueue republish`` would), then ``tomqueue worker --exit-on-complete`` runs them.
Baseline: ``bench.dj_baseline --max-jobs batch`` on the same table; the rows ours consumed
are put back first (same ``run_at``), so both run against the same backlog. The baseline
stops after ``w2_budget`` seconds (Delayed::Job on a large failed backlog can take minutes
for 2,000 jobs); its time per job is then over the jobs it did run.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import text

from bench import preload, procs
from bench.env import Target, analyze, purge_broker, reset
from bench.jobs import Stamp, read_stamps
from bench.options import SHAPES, Options
from tomqueue import handler as handlers
from tomqueue.db import utcnow
from tomqueue.message import Notification
from tomqueue.transport import get_publisher

PUBLISH_CHUNK = 500


def per_job_ms(times: list[float]) -> float | None:
    """Milliseconds per job over the middle 80 % of the starts (the first and last tenth
    are threads starting up and the last jobs draining)."""
    times = sorted(times)
    first, last = len(times) // 10, len(times) - 1 - len(times) // 10
    if last <= first:
        return None
    return (times[last] - times[first]) * 1000 / (last - first)


def new_stamps(path: str, skip: int) -> list[float]:
    """Start times recorded in ``path`` after its first ``skip`` lines."""
    return [t for t, _ in read_stamps(path)[skip:]]


def load_backlog(target: Target, shape: str, size: int, batch: int, handler: str) -> datetime:
    """Empty the table, load ``size`` rows of ``shape`` (+ ``batch`` due jobs on top)."""
    reset(target)
    now = utcnow()
    preload.load(target, preload.rows(shape, size, handler, now))
    if shape != "ready":
        preload.load(target, preload.rows("due", batch, handler, now))
    analyze(target)
    return now


def measured_ids(shape: str, size: int, batch: int) -> tuple[int, int]:
    """The id range of the jobs ours runs (the first ``batch`` in Delayed::Job's order)."""
    return (1, batch) if shape == "ready" else (size + 1, size + batch)


def publish_notifications(target: Target, lo: int, hi: int) -> int:
    query = text(
        "SELECT id, version, run_at, priority, queue FROM delayed_jobs "
        "WHERE id BETWEEN :lo AND :hi ORDER BY id"
    )
    with target.engine.connect() as conn:
        rows = conn.execute(query, {"lo": lo, "hi": hi}).all()
    notes = [
        Notification(r.id, r.version, r.run_at, r.priority, r.queue, "bench.jobs:Stamp")
        for r in rows
    ]
    publisher = get_publisher(target.config)
    for i in range(0, len(notes), PUBLISH_CHUNK):
        publisher.publish(notes[i : i + PUBLISH_CHUNK])
    return len(notes)


def run_process(proc: procs.Proc, timeout: float) -> tuple[float, bool]:
    """Wait for the process; returns (wall seconds, whether it had to be cut short)."""
    try:
        proc.wait(timeout)
        return time.monotonic() - proc.started, False
    except RuntimeError:
        return time.monotonic() - proc.started, True
    finally:
        proc.kill()
        proc.close()


def measure_ours(
    target: Target, opts: Options, shape: str, size: int, ids: tuple[int, int]
) -> dict[str, Any]:
    purge_broker(target)
    published = publish_notifications(target, *ids)
    worker = procs.tomqueue_worker(target, opts.threads, True, f"w2-{shape}-{size}")
    wall, cut = run_process(worker, timeout=max(60.0, opts.sizes.w2_budget * 3))
    return {"published": published, "wall_s": wall, "cut": cut}


def restore_batch(
    target: Target, shape: str, batch: int, handler: str, now: datetime
) -> tuple[int, int]:
    """Put back the jobs just run, with the same ``run_at`` (so they are again the first in
    Delayed::Job's order); returns their id range."""
    preload.load(target, preload.rows("ready" if shape == "ready" else "due", batch, handler, now))
    analyze(target)
    with target.engine.connect() as conn:
        top = int(conn.execute(text("SELECT MAX(id) FROM delayed_jobs")).scalar_one())
    return top - batch + 1, top


def measure_baseline(target: Target, opts: Options, shape: str, size: int) -> dict[str, Any]:
    batch = opts.sizes.w2_batch
    proc = procs.dj_baseline(
        target,
        opts.baseline_threads,
        f"w2-{shape}-{size}",
        "--exit-on-empty",
        "--max-jobs",
        str(batch),
        "--max-seconds",
        str(opts.sizes.w2_budget),
    )
    wall, cut = run_process(proc, timeout=opts.sizes.w2_budget + 60)
    return {"wall_s": wall, "cut": cut or wall > opts.sizes.w2_budget}


def measure(target: Target, opts: Options, shape: str, size: int) -> dict[str, Any]:
    """Ours, then the baseline, ``opts.repeat`` times on one backlog (the batch is put back
    after each run); both record into one stamp file. The median run counts."""
    batch = opts.sizes.w2_batch
    stamps = target.path(f"w2-{shape}-{size}.stamps")
    stamps.unlink(missing_ok=True)  # the stamps counted are this call's alone
    path = str(stamps)
    handler = handlers.dump(Stamp(path))
    now = load_backlog(target, shape, size, batch, handler)
    ids, seen = measured_ids(shape, size, batch), 0
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    for _ in range(opts.repeat):
        for side in ("ours", "baseline"):
            if side == "ours":
                result = measure_ours(target, opts, shape, size, ids)
            else:
                result = measure_baseline(target, opts, shape, size)
            times = new_stamps(path, seen)
            seen += len(times)
            runs[side].append({**result, "ms_per_job": per_job_ms(times), "processed": len(times)})
            ids = restore_batch(target, shape, batch, handler, now)
    return {side: median_run(results) for side, results in runs.items()}


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time per job, and every run's time per job."""
    timed = sorted(results, key=lambda r: r["ms_per_job"] or float("inf"))
    return {**timed[(len(timed) - 1) // 2], "runs_ms_per_job": [r["ms_per_job"] for r in results]}


def ratios(by_size: dict[int, dict[str, Any]], side: str) -> float | None:
    sizes = sorted(by_size)
    small, large = by_size[sizes[0]][side]["ms_per_job"], by_size[sizes[-1]][side]["ms_per_job"]
    return large / small if small and large else None


def run(target: Target, opts: Options) -> dict[str, Any]:
    shapes: dict[str, Any] = {}
    for shape in SHAPES:
        by_size = {size: measure(target, opts, shape, size) for size in opts.sizes.w2_sizes}
        shapes[shape] = {
            "sizes": {str(size): result for size, result in by_size.items()},
            "ratio_ours": ratios(by_size, "ours"),
            "ratio_baseline": ratios(by_size, "baseline"),
        }
    reset(target)
    return {"sizes": list(opts.sizes.w2_sizes), "batch": opts.sizes.w2_batch, "shapes": shapes}
