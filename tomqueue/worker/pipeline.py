"""The threads that run the worker stack over the deliveries the main thread hands in.

    main thread ──submit()──▶ locker thread: the batch layers' way down
                                   │ (lock a batch in one transaction)
                                   ▼ locked jobs, most urgent first
                              job threads (N): the job layers (timeout ▸ invoke)
                                   │ finished jobs, and those stopped on the way down
                                   ▼
                              recorder thread: the batch layers' way up
                                   (record a batch in one transaction, then ack it)

A delivery takes one of the N job places from ``submit`` until its job thread is done with
it (or a batch layer stops it); whatever arrives while the locker or the recorder is busy
joins their next batch, so a busy worker does one commit for many jobs and an idle one
pays no waiting. The watchdog (``watchdog.py``) watches the running jobs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from tomqueue.config import LEVELS
from tomqueue.transport.base import Delivery
from tomqueue.worker import db_lock, stack, timeout
from tomqueue.worker.outcome import Released
from tomqueue.worker.watchdog import Slot, Watchdog
from tomqueue.worker.work import Batch, Context, Work

log = logging.getLogger("tomqueue.worker")

MAX_RECORD_BATCH = 500
LATE_RETRY_SECONDS = 5.0  # an idle recorder's retries of outcomes it could not write
LOCKERS = 2  # while one waits for the database, the other locks the next batch
STOP_JOIN = 5.0  # seconds stop() waits for all of its threads together


def urgency(delivery: Delivery) -> tuple[int, float]:
    """Sort key: most urgent level first, then first come."""
    level = LEVELS.index(delivery.level) if delivery.level in LEVELS else 1
    return level, delivery.received_at


class Pipeline:
    def __init__(self, ctx: Context, threads: int, wake_main: Callable[[], None]) -> None:
        self.ctx = ctx
        self.threads = threads
        self._wake_main = wake_main
        self._lock = threading.Lock()
        self._busy = 0  # job places taken
        self._unrecorded = 0  # works on their way up
        self._main_waits = False
        self._idle = threading.Event()
        self._idle.set()
        self._inbox: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._runnable: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        ctx.watchdog = self.watchdog = Watchdog(ctx, self._attend)
        self._threads: list[threading.Thread] = []

    # --- main thread -------------------------------------------------------------------

    def start(self) -> None:
        self.watchdog.start()
        for _ in range(LOCKERS):
            self._spawn(self._locker, "tomqueue-locker")
        self._spawn(self._recorder, "tomqueue-recorder")
        for _ in range(self.threads):
            self._spawn(self._job_thread, "tomqueue-job")

    def free(self) -> int:
        """Job places free now; when none is, the next one to free up wakes the main thread."""
        with self._lock:
            free = self.threads - self._busy
            self._main_waits = free <= 0
            return free

    def submit(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            with self._lock:
                self._busy += len(deliveries)
                self._idle.clear()
            self._inbox.put([Work(self.ctx, d) for d in deliveries])

    def idle(self) -> bool:
        return self._idle.is_set()

    def load(self) -> tuple[int, int]:
        """(job places taken, finished works not yet recorded)."""
        with self._lock:
            return self._busy, self._unrecorded

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """Stop the threads (call when idle; an abandoned job thread runs on alone)."""
        for _ in range(LOCKERS):
            self._inbox.put(None)
        self._finished.put(None)
        for _ in range(self.threads):
            self._runnable.put(None)
        deadline = time.monotonic() + STOP_JOIN  # abandoned job threads never end
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.watchdog.stop()

    # --- the threads -------------------------------------------------------------------

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _locker(self) -> None:
        try:
            self._lock_batches()
        finally:
            self.ctx.release_connection()

    def _lock_batches(self) -> None:
        sent: set[Work] = set()

        def dispatch(batch: Batch) -> None:
            """The bottom of the batch layers: locked jobs go to the job threads."""
            sent.update(batch)
            for work in sorted(batch, key=lambda w: urgency(w.delivery)):
                self._runnable.put(work)

        descend = stack.descend(dispatch)
        while (batch := self._inbox.get()) is not None:
            while not self._inbox.empty():  # whatever else arrived joins this batch
                more = self._inbox.get()
                if more is None:
                    self._inbox.put(None)
                    break
                batch += more
            sent.clear()
            descend(batch)
            done = [w for w in batch if w not in sent]
            self._send_up([w for w in done if not w.requeued])
            self._release(len(done))

    def _job_thread(self) -> None:
        run = stack.job()
        while True:
            work = self._runnable.get()
            if work is None:
                return
            try:
                run(work)
            except BaseException:
                log.exception("job thread error", extra={**work.log_extra, "action": "bug"})
                work.outcome = work.outcome or Released("the worker failed running the job")
            if work.abandoned:  # a new job thread took this one's place long ago
                self._release_abandoned(work)
                return
            self._send_up([work])
            self._release(1)

    def _release_abandoned(self, work: Work) -> None:
        """Record (on its own: the pipeline may have stopped meanwhile) the release of a
        job whose thread was abandoned, now that the thread ends; then end the thread."""
        try:
            stack.ascend()([work])
        finally:
            self.ctx.release_connection()
            with self.ctx.lock:
                self.ctx.abandoned_threads -= 1

    def _recorder(self) -> None:
        try:
            self._record_batches()
        finally:
            self.ctx.release_connection()

    def _record_batches(self) -> None:
        ascend = stack.ascend()
        while (first := self._next_finished()) is not None:
            batch = [first]
            while len(batch) < MAX_RECORD_BATCH and not self._finished.empty():
                work = self._finished.get()
                if work is None:
                    self._finished.put(None)  # stop after this batch
                    break
                batch.append(work)
            ascend(batch)
            with self._lock:
                self._unrecorded -= len(batch)
                idle = self._busy == 0 and self._unrecorded == 0
                if idle:
                    self._idle.set()
            if idle:
                self._wake_main()

    def _next_finished(self) -> Work | None:
        """The next finished job (None: stop). While outcomes wait to be written
        (``db_lock.record_late``), an idle recorder retries them every few seconds: they
        do not wait for the next job to come along."""
        while True:
            wait = LATE_RETRY_SECONDS if self.ctx.unrecorded else None
            try:
                return self._finished.get(timeout=wait)
            except queue.Empty:
                db_lock.record_late(self.ctx)

    # --- bookkeeping -------------------------------------------------------------------

    def _send_up(self, works: Batch) -> None:
        if works:
            with self._lock:
                self._unrecorded += len(works)
            for work in works:
                self._finished.put(work)

    def _release(self, n: int) -> None:
        if n:
            with self._lock:
                self._busy -= n
                idle = self._busy == 0 and self._unrecorded == 0
                wake = self._main_waits or idle
                self._main_waits = False
                if idle:
                    self._idle.set()
            if wake:
                self._wake_main()

    def _attend(self, slot: Slot, now: float) -> float:
        """The watchdog's rounds; an abandoned job's place goes to a new job thread."""
        was_abandoned = slot.abandoned
        again = timeout.attend(slot, now)
        if slot.abandoned and not was_abandoned:
            self._release(1)
            self._spawn(self._job_thread, "tomqueue-job")
        return again
