"""Where does a job's time go? Counts and times every per-job cost of ``tomqueue.enqueue``
and of the worker, in-process, without changing the library.

    python -m bench.profile_worker --db postgresql --jobs 2000 --threads 4
    python -m bench.profile_worker --summarize bench/results/work/postgresql-profile-w1.txt

The first form enqueues ``--jobs`` no-op jobs and runs a ``Worker`` in a thread, with
counters on SQLAlchemy (statements by verb, commits, pool checkouts = pre-pings), on pika
(RPCs, acks, publishes, cross-thread callbacks), on thread starts and log records, and a
timer around each layer of the worker stack and the calls that wait. The second form
summarizes a py-spy ``--format raw`` file (``python -m bench --profile`` writes one).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event

import tomqueue
from bench.env import Target, delete_broker_objects, prepare, table_empty
from bench.jobs import Noop
from bench.options import DATABASES, url_for
from tomqueue.db import get_engine
from tomqueue.transport import close_publishers

counts: Counter[str] = Counter()
timings: defaultdict[str, float] = defaultdict(float)
_lock = threading.Lock()


def bump(key: str, n: int = 1) -> None:
    with _lock:
        counts[key] += n


def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                timings[key] += time.perf_counter() - started
                counts[f"calls {key}"] += 1

    return wrapper


def patch(owner: Any, name: str, key: str) -> None:
    setattr(owner, name, timed(key, getattr(owner, name)))


# --- instrumentation ----------------------------------------------------------------


def instrument_database(target: Target) -> None:
    engine = get_engine(target.config)

    @event.listens_for(engine, "before_cursor_execute")
    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        bump(f"sql {statement.split(None, 1)[0].upper()}")

    @event.listens_for(engine, "commit")
    def on_commit(_conn: Any) -> None:
        bump("sql COMMIT")

    @event.listens_for(engine.pool, "checkout")
    def on_checkout(*_args: Any) -> None:
        bump("pool checkout (+1 pre-ping round trip)")


def instrument_broker() -> None:
    from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

    patch(BlockingChannel, "queue_declare", "amqp queue_declare (RPC)")
    patch(BlockingChannel, "basic_ack", "amqp basic_ack")
    patch(BlockingChannel, "basic_publish", "amqp basic_publish (+confirm wait)")
    patch(BlockingConnection, "add_callback_threadsafe", "amqp add_callback_threadsafe")


def instrument_enqueue() -> None:
    module = importlib.import_module("tomqueue.enqueue")  # the package attribute is the function
    patch(module, "validate", "enqueue.validate (+ handler.dump)")
    patch(module, "persist", "enqueue.persist (checkout + autocommit INSERT)")
    patch(module, "publish", "enqueue.publish (hand-off to the background publisher)")


def instrument_worker() -> None:
    from types import SimpleNamespace

    from tomqueue.transport.amqp_consumer import AmqpConsumer
    from tomqueue.worker import db_lock, outcome, stack

    def name(layer: Any) -> str:  # a module (batch layers) or a function (job layers)
        return str(getattr(layer, "__module__", None) or layer.__name__).rsplit(".", 1)[1]

    # the pipeline's threads compose the stack from these when they start
    stack.BATCH_LAYERS = tuple(
        SimpleNamespace(
            enter=timed(f"layer {name(layer)}.enter (batch, down)", layer.enter),
            leave=timed(f"layer {name(layer)}.leave (batch, up)", layer.leave),
        )
        for layer in stack.BATCH_LAYERS
    )
    stack.JOB_LAYERS = tuple(
        timed(f"layer {name(layer)} (job)", layer) for layer in stack.JOB_LAYERS
    )
    patch(db_lock, "lock_batch", "db_lock.lock_batch (lock statement)")
    patch(outcome, "record_batch", "outcome.record_batch (DELETE ... RETURNING)")
    patch(AmqpConsumer, "ack_many", "consumer.ack_many (hand-off to the I/O loop)")
    patch(AmqpConsumer, "take_above", "consumer.take_above (main thread)")
    patch(AmqpConsumer, "poll", "consumer.poll (main thread: I/O wait included)")
    original_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        bump("threads started")
        original_start(self)

    threading.Thread.start = start  # type: ignore[method-assign]


class _CountRecords(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        bump(f"log records ({logging.getLevelName(record.levelno)})")


@contextmanager
def measuring() -> Iterator[None]:
    counts.clear()
    timings.clear()
    yield


def report(title: str, jobs: int, seconds: float) -> None:
    print(f"\n{title}: {jobs} jobs in {seconds:.2f}s = {jobs / seconds:.0f}/s")
    for key, n in sorted(counts.items()):
        if not key.startswith("calls "):
            print(f"  {n / jobs:6.2f} per job  {key}")
    for key, total in sorted(timings.items(), key=lambda kv: -kv[1]):
        calls = counts[f"calls {key}"]
        print(f"  {total / jobs * 1000:6.2f} ms/job  ({calls / jobs:.2f} calls/job)  {key}")


# --- the run ------------------------------------------------------------------------


def run(db: str, jobs: int, threads: int) -> None:
    from tomqueue.worker.process import Worker

    workdir = Path(tempfile.mkdtemp(prefix="tq-profile-"))
    target = Target(db, url_for(db), url_for("amqp"), "benchprofile", workdir)
    prepare(target, dj_index=False)
    instrument_database(target)
    instrument_broker()
    logging.getLogger("tomqueue").addHandler(_CountRecords())
    logging.getLogger("tomqueue").setLevel(logging.INFO)
    instrument_enqueue()
    with measuring():
        started = time.perf_counter()
        for _ in range(jobs):
            tomqueue.enqueue(Noop(), config=target.config)
        report("enqueue (tomqueue.enqueue, one by one)", jobs, time.perf_counter() - started)
    instrument_worker()
    with measuring():
        worker = Worker(
            target.config, imports=["bench.jobs"], threads=threads, exit_on_complete=True
        )
        started = time.perf_counter()
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        thread.join(600)
        seconds = time.perf_counter() - started
        report(f"worker ({threads} threads)", jobs, seconds)
    assert table_empty(target), "the worker left jobs behind"
    close_publishers()
    delete_broker_objects(target)
    print(
        "\n(layer times are inclusive of the layers below them; threads overlap, so "
        "ms/job sums can exceed wall time / jobs)"
    )


def summarize(path: str, top: int = 40) -> None:
    """Inclusive share of py-spy samples per function (each counted once per stack)."""
    total, inclusive = 0, Counter[str]()
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        names = {_frame_name(frame) for frame in stack.split(";")}
        for name in names:
            inclusive[name] += int(n)
    print(f"{total} samples")
    for name, samples in inclusive.most_common(top):
        print(f"  {samples / total * 100:5.1f}%  {name}")


def _frame_name(frame: str) -> str:
    function, _, where = frame.partition(" (")
    return f"{function} ({where.split(':')[0]})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", choices=DATABASES, default="postgresql")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--summarize", metavar="PY_SPY_RAW_FILE")
    args = p.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
    else:
        run(args.db, args.jobs, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
