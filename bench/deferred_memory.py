"""Memory the deferred manager spends per held job, at 100,000 held.

    python -m bench.deferred_memory            # heap structure, measured with tracemalloc
    python -m bench.deferred_memory --live     # also: RSS of a real manager process holding
                                               # the jobs on the broker (TOMQUEUE_AMQP_URL or
                                               # the test broker), under a private prefix

The tracemalloc figure is what the heap itself costs (entries, interned metadata, arrival
buckets). The live figure adds everything else a delivery costs the process (pika's frame
buffers are transient) and is noisier: the allocator keeps freed memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid
from datetime import datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deferred.heap import Arrivals, DeferredHeap  # noqa: E402
from tomqueue.config import LEVELS  # noqa: E402
from tomqueue.message import Notification, decode  # noqa: E402

GOAL_BYTES = 300
KINDS = [f"app.jobs.billing:InvoiceJob{i}" for i in range(20)]
QUEUES = [None, "mail", "reports"]


def sample_messages(count: int) -> list[tuple[bytes, dict[str, object]]]:
    """Realistic (body, headers) pairs: 20 job classes, 3 queues, run_at over one day."""
    start = datetime(2030, 1, 1)
    out = []
    for i in range(count):
        note = Notification(
            job_id=10_000_000 + i,
            version=1 + i % 3,
            run_at=start + timedelta(microseconds=(i * 864_123_457) % 86_400_000_000),
            priority=(-10, 0, 1, 10)[i % 4],
            queue=QUEUES[i % 3],
            kind=KINDS[i % 20],
        )
        out.append((note.encode(), note.headers(LEVELS[i % 4])))
    return out


def heap_bytes_per_job(count: int) -> float:
    messages = sample_messages(count)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    heap, arrivals = DeferredHeap(), Arrivals(60.0)
    for tag, (body, headers) in enumerate(messages, start=1):
        heap.push(decode(body, headers), tag)
        arrivals.note(tag, tag / 1000)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(heap) == count
    return (after - before) / count


def live_bytes_per_job(count: int) -> float:
    """RSS growth of a real ``python -m deferred`` while it takes ``count`` deliveries."""
    import pika
    import psutil

    from tomqueue.config import Config
    from tomqueue.topology import Topology
    from tomqueue.transport.amqp import declare_deferred

    url = os.environ.get("TOMQUEUE_AMQP_URL") or os.environ.get(
        "TOMQUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
    )
    config = Config(amqp_url=url, prefix=f"benchmem{uuid.uuid4().hex[:8]}")
    topology = Topology.of(config)
    env = {**os.environ, "TOMQUEUE_AMQP_URL": url, "TOMQUEUE_PREFIX": config.prefix}
    env["PYTHONPATH"] = str(REPO_ROOT)
    manager = subprocess.Popen(
        [sys.executable, "-m", "deferred"], cwd=REPO_ROOT, env=env, start_new_session=True
    )
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    try:
        declare_deferred(channel, topology)
        _wait(lambda: _consumers(channel, topology.deferred_queue) == 1, 30)
        time.sleep(1.0)
        rss_before = psutil.Process(manager.pid).memory_info().rss
        for body, headers in sample_messages(count):
            props = pika.BasicProperties(delivery_mode=2, headers=headers)
            channel.basic_publish(topology.deferred_exchange, "", body, props)
        _wait(lambda: _ready(channel, topology.deferred_queue) == 0, 120)
        time.sleep(2.0)  # let the last deliveries be dispatched onto the heap
        rss_after = psutil.Process(manager.pid).memory_info().rss
    finally:
        manager.send_signal(signal.SIGTERM)
        manager.wait(30)
        channel.queue_delete(topology.deferred_queue)
        channel.exchange_delete(topology.deferred_exchange)
        channel.exchange_delete(topology.work_exchange)
        connection.close()
    return float(rss_after - rss_before) / count


def _ready(channel: object, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)  # type: ignore[attr-defined]


def _consumers(channel: object, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.consumer_count)  # type: ignore[attr-defined]


def _wait(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g}s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.deferred_memory", description=__doc__)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--live", action="store_true", help="also measure a manager process")
    args = p.parse_args(argv)
    per_job = heap_bytes_per_job(args.jobs)
    verdict = "ok" if per_job <= GOAL_BYTES else "OVER GOAL"
    print(
        f"deferred heap: {per_job:.0f} bytes per held job at {args.jobs:,} held "
        f"(tracemalloc; goal <= {GOAL_BYTES}): {verdict}"
    )
    if args.live:
        rss = live_bytes_per_job(args.jobs)
        print(f"deferred manager process: {rss:.0f} bytes of RSS per held job at {args.jobs:,}")
    return 0 if per_job <= GOAL_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
