"""The deferred manager: holds future jobs' notifications and releases each when it is due.

    consume <prefix>.work.deferred (unacked) ─▶ heap by run_at ─due─▶ publish to <prefix>.work
                                                                      (confirmed) ─▶ ack

- **Due** means ``run_at <= now`` by this process's clock. The loop sleeps exactly until the
  next entry is due (``process_data_events(time_limit=...)``), wakes early when a delivery
  arrives, and publishes many entries with their confirms in flight.
- **Refresh** (principle 3): no delivery is held longer than ``refresh_interval``. Older ones
  are published again to the *deferred* exchange (a fresh copy, confirmed), then the old
  delivery is acked. They never pass through the worker queues before they are due.
- **Recovery**: a closed connection or channel, a failed publish or a cancelled consumer
  ends the session: the heap is cleared (the broker requeues every unacked delivery and
  redelivers it, so nothing is held twice) and a new session is opened with bounded
  exponential backoff. A cancelled consumer usually means the queue was deleted with the
  held messages in it, so the held notifications are first re-published to the re-declared
  queue.
- **Malformed messages** are logged (what can be read of them) and acked: the sweeper
  recovers the job, if there is one, from the database.
- **Several managers** may consume the queue at once; each holds a disjoint share. A
  duplicate notification is harmless: workers check the job's version in the database.
- **TERM/INT** stop promptly: confirms in flight are awaited briefly, the connection is
  closed (the broker requeues what was held) and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from types import FrameType

from pika.exceptions import AMQPError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from deferred.heap import from_us
from deferred.holding import Holding, SessionLost
from deferred.options import DEFAULT_REFRESH, DEFAULT_STATS_INTERVAL, check_refresh, check_stats
from deferred.options import parse as parse_options
from deferred.registry import Holdings, ManagerRecord
from deferred.session import Session
from tomqueue import metrics
from tomqueue.config import Config, default_worker_name
from tomqueue.errors import BrokerUnavailable, ConfigError, PublishError, TomQueueError
from tomqueue.logconfig import setup as setup_logging
from tomqueue.runtime import settle_gc

log = logging.getLogger("deferred")

WINDOW = 1000  # publishes awaiting their confirms at once
DRAIN_LIMIT = 5.0  # at shutdown, how long confirms in flight are awaited
MIN_SESSION = 5.0  # a session that ends sooner is followed by a pause

CONNECT_ERRORS = (AMQPError, OSError, BrokerUnavailable, PublishError)
RECOVERABLE = (*CONNECT_ERRORS, SessionLost)


class Manager:
    def __init__(
        self,
        config: Config,
        refresh_interval: float = DEFAULT_REFRESH,
        stats_interval: float = DEFAULT_STATS_INTERVAL,
        window: int = WINDOW,
    ) -> None:
        if not config.amqp_url:
            raise ConfigError(
                "amqp_url must be set (TOMQUEUE_AMQP_URL): the deferred manager works on the "
                "broker; the DB-polling transport needs no deferred manager"
            )
        self.config = config
        self.refresh_interval = check_refresh(refresh_interval)
        self.stats_interval = check_stats(stats_interval)
        self.counters: Counter[str] = Counter()
        self.holding = Holding(config, self.refresh_interval, window, self.counters)
        self._session: Session | None = None
        self._stop = threading.Event()
        self._signals = 0
        self._next_stats = 0.0
        self.name = default_worker_name()
        queue = self.holding.topology.deferred_queue
        self.record = ManagerRecord(config, self.name, queue, self.holdings)

    # --- status (any thread) ------------------------------------------------------------

    def held_count(self) -> int:
        """Deliveries held unacked: waiting in the heap or being published."""
        session = self._session
        in_flight = session.publisher.in_flight if session is not None else 0
        return len(self.holding) + in_flight

    def next_due(self) -> datetime | None:
        """``run_at`` (naive UTC) of the earliest held job."""
        us = self.holding.heap.next_due_us()
        return None if us is None else from_us(us)

    def holdings(self) -> Holdings:
        return Holdings(self.held_count(), self.next_due(), self.counters["published"])

    def request_stop(self) -> None:
        self._stop.set()

    # --- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; 0 on a requested stop. ``ConfigError`` if it cannot start."""
        self._install_signals()
        log.info(
            "deferred manager %s starting: %s, refresh interval %gs",
            self.name,
            self.config.describe(),
            self.refresh_interval,
            extra={"action": "deferred_start"},
        )
        self.record.start()
        try:
            while not self._stop.is_set():
                self._session_once()
        finally:
            self._log_stats("deferred_exit")
            self.record.stop()
        return 0

    def _session_once(self) -> None:
        started = time.monotonic()
        try:
            self._session = self._open()
            self._serve(self._session)
        except RECOVERABLE as exc:
            if not self._stop.is_set():
                self.counters["reconnects"] += 1
                metrics.RECONNECTS.labels("deferred").inc()
                log.warning(
                    "broker session lost (%s: %s); reconnecting",
                    type(exc).__name__,
                    exc,
                    extra={"action": "reconnect"},
                )
        finally:
            self._release()
        if not self._stop.is_set() and time.monotonic() - started < MIN_SESSION:
            self._pause(1.0)

    def _open(self) -> Session:
        retrying = Retrying(
            retry=retry_if_exception_type(CONNECT_ERRORS),
            wait=wait_exponential(multiplier=0.5, max=30) + wait_random(0, 0.5),
            stop=lambda _state: self._stop.is_set(),
            sleep=self._pause,
            before_sleep=_log_retry,
            reraise=True,
        )
        holding = self.holding
        session: Session = retrying(self._connect, holding)
        log.info(
            "holding the deliveries of %s (prefetch unlimited)",
            holding.topology.deferred_queue,
            extra={"action": "deferred_consume"},
        )
        return session

    def _connect(self, holding: Holding) -> Session:
        if self._stop.is_set():
            raise BrokerUnavailable("stopped before connecting")  # ends the retries
        return Session(self.config, holding.on_message, holding.on_cancel)

    def _serve(self, session: Session) -> None:
        self._next_stats = time.monotonic() + self.stats_interval
        holding = self.holding
        while not self._stop.is_set():
            holding.release(session)
            metrics.DEFERRED_HELD.set(self.held_count())
            self._maybe_log_stats()
            session.connection.process_data_events(
                time_limit=holding.idle_time(session, self._next_stats)
            )
            if holding.cancelled:
                self._salvage(session)
                raise SessionLost("the broker cancelled the consumer (deferred queue deleted?)")
            broken = session.broken()
            if broken is not None:
                raise SessionLost(broken)
        holding.drain(session, min(DRAIN_LIMIT, self.config.publish_timeout))

    def _salvage(self, session: Session) -> None:
        held = len(self.holding)
        try:
            done, failed = self.holding.salvage(session)
        except (*RECOVERABLE, ConfigError) as exc:
            done, failed = 0, held
            log.error("re-publishing held jobs failed: %s", exc, extra={"action": "salvage"})
        log.warning(
            "the broker cancelled the consumer of %s; re-published %d held job(s), %d failed "
            "(the sweeper recovers those)",
            self.holding.topology.deferred_queue,
            done,
            failed,
            extra={"action": "salvage", "held": held},
        )

    def _release(self) -> None:
        """Close the session; whatever it held goes back to the queue (broker requeue)."""
        session, self._session = self._session, None
        held = len(self.holding)
        if session is not None:
            session.close()
            if self._stop.is_set():
                log.info(
                    "released %d held job(s) to the deferred queue",
                    held,
                    extra={"action": "deferred_release", "held": held},
                )
        self.holding.clear()

    # --- signals, pauses, statistics -------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(1)  # a second signal: exit at once; the broker requeues what was held
        log.info(
            "signal %s: releasing held jobs and exiting",
            signal.Signals(signum).name,
            extra={"action": "deferred_stop"},
        )
        self._stop.set()

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self._stop.wait(min(left, 0.1))

    def _maybe_log_stats(self) -> None:
        if time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + self.stats_interval
            self._log_stats("deferred_stats")

    def _log_stats(self, action: str) -> None:
        due = self.next_due()
        due_text = due.isoformat(timespec="milliseconds") + "Z" if due else None
        counts = {k: self.counters[k] for k in ("published", "refreshed", "dropped", "reconnects")}
        held = self.held_count()
        log.info(
            "holding %d job(s), next due %s; %s",
            held,
            due_text or "-",
            ", ".join(f"{k} {v}" for k, v in counts.items()),
            extra={"action": action, "held": held, "next_due": due_text, **counts},
        )


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("%s; retrying in %.1fs", exc, wait, extra={"action": "reconnect"})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deferred`` / ``tomqueue deferred``: returns the exit code."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"deferred: {exc}", file=sys.stderr)
        return 2
    try:
        setup_logging(options.log_format, options.log_config, options.verbose)
        config = Config.from_env()
        if options.metrics_port:
            metrics.serve(options.metrics_port)
        manager = Manager(config, options.refresh_interval, options.stats_interval)
        settle_gc()
        return manager.run()
    except TomQueueError as exc:
        print(f"deferred: {exc}", file=sys.stderr)
        return 2
