"""The watchdog: one thread that watches every running job of a worker process.

A job runs in its job thread; the watchdog interrupts it (an asynchronous exception raised
inside the job) when its ``max_run_time`` is up, when the worker is stopping and
``stop_grace`` has passed, or when the worker's lease is in danger. It never interrupts a
job twice; if the job is still running ``timeout_grace`` later, the timeout layer abandons
it (``timeout.abandon``). It also acks the delivery of a job that runs longer than
``delivery_hold_limit`` (see the pop layer).

A job thread and the watchdog agree through ``Slot.lock``: an interruption is sent only
while the slot is running, and ``Slot.finish`` ends that; ``clear_interruption`` then drops
one that was sent but not yet raised.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable

from tomqueue.worker.work import Context, Work

log = logging.getLogger("tomqueue.worker")

LEASE_CHECK_SECONDS = 1.0


class Slot:
    """One running job, as the watchdog sees it."""

    def __init__(self, work: Work, deadline: float, hold_deadline: float) -> None:
        self.work = work
        self.thread_id = threading.get_ident()
        self.started = time.monotonic()
        self.deadline = deadline
        self.hold_deadline = hold_deadline
        self.lock = threading.Lock()
        self.running = True
        self.interrupted: type[BaseException] | None = None
        self.interrupted_at = 0.0
        self.abandoned = False
        self.abandon_done = threading.Event()  # set once ``timeout.abandon`` has run

    def finish(self) -> None:
        """The job returned: no interruption is sent after this (idempotent)."""
        with self.lock:
            self.running = False

    def interrupt(self, kind: type[BaseException]) -> bool:
        with self.lock:
            if not self.running or self.interrupted is not None:
                return False
            self.interrupted, self.interrupted_at = kind, time.monotonic()
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread_id), ctypes.py_object(kind)
            )
            return True

    def mark_abandoned(self) -> bool:
        with self.lock:
            if not self.running or self.abandoned:
                return False
            self.abandoned = True
            return True


def clear_interruption() -> None:
    """Drop an interruption sent to this thread but not raised yet (NULL clears it)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)


class Watchdog:
    def __init__(
        self,
        ctx: Context,
        attend: Callable[[Slot, float], float],
    ) -> None:
        """``attend(slot, now)`` acts on one slot and returns when it next needs attention."""
        self.ctx = ctx
        self._attend = attend
        self._slots: set[Slot] = set()
        self._wake = threading.Condition(threading.Lock())  # never taken twice: no RLock
        self._planned = math.inf
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tomqueue-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def watch(self, work: Work, deadline: float, hold_deadline: float) -> Slot:
        slot = Slot(work, deadline, hold_deadline)
        with self._wake:
            self._slots.add(slot)
            first = min(deadline, hold_deadline)
            if first < self._planned:
                self._planned = first
                self._wake.notify()
        return slot

    def unwatch(self, slot: Slot) -> None:
        with self._wake:
            self._slots.discard(slot)

    def poke(self) -> None:
        """Look at every job now (a stop request, a lease in danger)."""
        with self._wake:
            self._planned = 0.0
            self._wake.notify()

    def running(self) -> list[Slot]:
        with self._wake:
            return list(self._slots)

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopped:
                    return
                delay = self._planned - time.monotonic()
                if delay > 0:
                    self._wake.wait(None if math.isinf(delay) else delay)
                if self._stopped:
                    return
                slots = list(self._slots)
                self._planned = math.inf  # a watch() meanwhile wakes us
            planned = self._round(slots)
            with self._wake:
                self._planned = min(self._planned, planned)

    def _round(self, slots: list[Slot]) -> float:
        now = time.monotonic()
        planned = math.inf
        for slot in slots:
            try:
                planned = min(planned, self._attend(slot, now))
            except Exception:
                log.exception("watchdog error", extra={"action": "watchdog_error"})
                planned = min(planned, now + LEASE_CHECK_SECONDS)
        if slots:  # notice a lease in danger well within the lease margin
            interval = min(LEASE_CHECK_SECONDS, self.ctx.config.heartbeat_interval / 4)
            planned = min(planned, now + interval)
        return planned
