"""A worker process: a main thread that owns the transport and dispatches deliveries to a
pool of job threads, most urgent level first.

Signals (main thread): the first TERM/INT stops taking work; running jobs get
``stop_grace`` seconds to finish, then are interrupted and released so they run again
promptly elsewhere; the process exits 0. A second TERM/INT exits at once (status 1).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from pika.exceptions import AMQPError
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from tenacity import Retrying, retry_if_exception_type, wait_exponential, wait_random

from tomqueue import metrics
from tomqueue.config import LEVELS, Config, default_worker_name, redact_url
from tomqueue.db import get_engine
from tomqueue.errors import BrokerUnavailable, ConfigError, DatabaseUnavailable
from tomqueue.registry import Heartbeat
from tomqueue.sweeper import PeriodicSweeper
from tomqueue.transport import Delivery, flush_publishers, make_consumer
from tomqueue.transport.base import Consumer
from tomqueue.worker import db_lock, slow_stop
from tomqueue.worker.pipeline import Pipeline, urgency
from tomqueue.worker.work import Context

log = logging.getLogger("tomqueue.worker")

EXIT_OK = 0
QUIET_BEFORE_EXIT = 0.2  # --exit-on-complete: seconds without a delivery before asking
EXIT_RESTART = 3  # too many abandoned job threads: a supervisor should start a fresh process
POLL_WAIT = 0.5  # seconds the dispatch loop waits for the broker when nothing can start
LEASE_LOST_HOLD = 1.0  # seconds a worker that cannot renew its lease holds a delivery


def import_modules(names: Sequence[str]) -> frozenset[str]:
    """Import the modules named by ``--import``; they are the only kinds a worker loads.

    Like ``python -m`` and Celery, the current directory is importable."""
    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"--import {name}: cannot import it ({exc})") from None
    return frozenset(names)


class Worker:
    def __init__(
        self,
        config: Config,
        imports: Sequence[str] = (),
        queues: Sequence[str] = (),
        threads: int = 1,
        min_priority: int | None = None,
        max_priority: int | None = None,
        exit_on_complete: bool = False,
        name: str | None = None,
    ) -> None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        self.config = config
        self.allowed = import_modules(imports)
        self.queues: list[str | None] = list(queues) or [None]  # default: the default queue
        self.threads = threads
        self.priority_range = (min_priority, max_priority)
        self.exit_on_complete = exit_on_complete
        self.name = name or default_worker_name()
        self.consumer: Consumer = make_consumer(config, self.queues, self.priority_range, threads)
        self.ctx = Context(config, get_engine(config), self.consumer, self.allowed, self.name)
        self.heartbeat = Heartbeat(
            config,
            self.ctx.engine,
            self.name,
            self.queues,
            current_jobs=lambda: sorted(self.ctx.running_jobs),
        )
        self.ctx.lease_valid = self.heartbeat.lease_valid
        self.sweeper = PeriodicSweeper(config, self.name)
        self.pipeline = Pipeline(self.ctx, threads, self.consumer.wake)
        self._buffer: list[Delivery] = []
        self._last_arrival = 0.0
        self._signals = 0

    # --- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "worker %s starting: %s, %d thread(s)",
            self.name,
            self.config.describe(),
            self.threads,
            extra={"action": "worker_start"},
        )
        self._check_database()
        self.heartbeat.start()
        self.sweeper.start()
        self.pipeline.start()
        try:
            self._connect()
            self._loop()
        finally:
            drained = self._drain()
            self.sweeper.stop()
            # a job still running must keep its lock until this process is gone
            self.heartbeat.stop(keep_record=self.ctx.abandoned_threads > 0 or not drained)
        log.info(
            "worker %s exiting: %s", self.name, self.ctx.counters, extra={"action": "worker_exit"}
        )
        return EXIT_RESTART if self._needs_restart() else EXIT_OK

    def request_stop(self) -> None:
        if not self.ctx.stopping.is_set():
            self.ctx.stop_deadline = time.monotonic() + self.config.stop_grace
            self.ctx.stopping.set()
            self.pipeline.watchdog.poke()
            self.consumer.wake()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", extra={"action": "worker_kill"})
            os._exit(1)
        log.info(
            "signal %s: finishing current jobs (grace %gs), then exiting",
            signal.Signals(signum).name,
            self.config.stop_grace,
            extra={"action": "worker_stop"},
        )
        self.request_stop()

    def _check_database(self) -> None:
        for attempt in self._retrying(DatabaseUnavailable):
            with attempt:
                try:
                    with self.ctx.engine.connect() as conn:
                        conn.execute(text("SELECT 1"))
                except OperationalError:
                    raise DatabaseUnavailable(
                        f"cannot reach the database at {redact_url(self.config.database_url)}"
                    ) from None

    def _connect(self) -> None:
        for attempt in self._retrying(BrokerUnavailable):
            with attempt:
                self.consumer.start()

    def _retrying(self, kind: type[Exception]) -> Retrying:
        def before_sleep(state: object) -> None:
            outcome = getattr(state, "outcome", None)
            exc = outcome.exception() if outcome is not None else None
            log.warning("%s; retrying", exc, extra={"action": "reconnect"})

        return Retrying(
            retry=retry_if_exception_type(kind),
            wait=wait_exponential(multiplier=0.5, max=30) + wait_random(0, 1),
            before_sleep=before_sleep,
            stop=lambda _state: self.ctx.stopping.is_set(),
            reraise=True,
        )

    # --- the dispatch loop -------------------------------------------------------------

    def _loop(self) -> None:
        while not self.ctx.stopping.is_set():
            if self._needs_restart():
                log.error(
                    "too many abandoned job threads; exiting for a restart",
                    extra={"action": "worker_restart"},
                )
                self.request_stop()
                break
            free = self.pipeline.free()
            try:
                arrived = self.consumer.poll(
                    self._poll_wait(free), max(0, free - len(self._buffer))
                )
                if arrived:
                    self._buffer += arrived
                    self._last_arrival = time.monotonic()
                self._dispatch()
            except (AMQPError, BrokerUnavailable) as exc:
                self._reconnect(exc)
            if self.exit_on_complete and self._completed():
                log.info("no more jobs: exiting (--exit-on-complete)")
                break

    def _poll_wait(self, free: int) -> float:
        """How long the loop may wait for the broker: not at all while buffered deliveries
        can start; otherwise until something arrives (at most ``POLL_WAIT``). A worker that
        cannot renew its lease starts nothing, so its buffer does not count then."""
        if self._buffer and free > 0 and self.ctx.lease_valid():
            return 0.0
        return POLL_WAIT

    def _completed(self) -> bool:
        """Nothing buffered, running or waiting in our queues — once the jobs this process
        enqueued (a job may enqueue others) have reached the broker."""
        if self._buffer or not self.pipeline.idle():
            return False
        if time.monotonic() - self._last_arrival < QUIET_BEFORE_EXIT:
            return False  # still flowing: asking the broker now would only stall the loop
        flush_publishers(self.config.publish_timeout)
        return self.consumer.is_drained()

    def _dispatch(self) -> None:
        """Hand the most urgent buffered deliveries to the free job places. Messages more
        urgent than the least urgent job about to start, still waiting in the broker, are
        fetched first and start in its place (strict priority)."""
        self._requeue_stale()
        free = self.pipeline.free()
        if not self._buffer or free <= 0 or not self.ctx.lease_valid():
            return
        self._buffer.sort(key=urgency)
        least = self._buffer[min(free, len(self._buffer)) - 1].level
        if least != LEVELS[0]:
            more = self.consumer.take_above(least, free)
            if more:
                self._buffer += more
                self._buffer.sort(key=urgency)
        chosen, self._buffer = self._buffer[:free], self._buffer[free:]
        self.pipeline.submit(chosen)

    def _requeue_stale(self) -> None:
        """Give back the deliveries held too long: ``delivery_hold_limit``, or
        ``LEASE_LOST_HOLD`` while this worker cannot renew its lease (cut off from the
        database, it may lock nothing; workers that can reach it take them meanwhile)."""
        hold = self.config.delivery_hold_limit if self.ctx.lease_valid() else LEASE_LOST_HOLD
        limit = time.monotonic() - hold
        for delivery in [d for d in self._buffer if d.received_at < limit]:
            self._buffer.remove(delivery)
            self.consumer.requeue(delivery)

    def _reconnect(self, exc: BaseException) -> None:
        log.warning(
            "broker connection lost (%s); reconnecting",
            type(exc).__name__,
            extra={"action": "reconnect"},
        )
        metrics.RECONNECTS.labels("worker").inc()
        self._buffer.clear()  # the broker requeues whatever the old channel held
        self.consumer.close()
        self._connect()

    def _drain(self) -> bool:
        """Let running jobs finish (or be released), keeping the connection's I/O going:
        the acks and follow-up notifications of the last jobs go through it. The grace
        applies however the loop ended (a stop request, or an error on its way out).
        False if it gave up (``slow_stop.GIVE_UP``) with work still in the pipeline."""
        self.request_stop()
        for delivery in self._buffer:
            try:
                self.consumer.requeue(delivery)
            except Exception:  # the broker redelivers unacked messages anyway
                break
        self._buffer.clear()
        started, reported = time.monotonic(), False
        config = self.config
        give_up_at = started + config.stop_grace + config.timeout_grace + slow_stop.GIVE_UP
        while not self.pipeline.idle():
            now = time.monotonic()
            if not reported and now - started > config.stop_grace + slow_stop.MARGIN:
                reported = True
                slow_stop.report(now - started, *self.pipeline.load())
            if now > give_up_at:
                slow_stop.give_up(now - started, *self.pipeline.load())
                break
            try:
                self.consumer.poll(0.1, 0)
            except (AMQPError, BrokerUnavailable):
                time.sleep(0.1)
        drained = self.pipeline.idle()
        self.pipeline.stop()  # its recorder may have been retrying them: now it is done
        db_lock.record_at_exit(self.ctx)
        self.consumer.close()
        return drained

    def _needs_restart(self) -> bool:
        return self.ctx.abandoned_threads > self.threads
