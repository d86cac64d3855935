"""The background publisher: ``enqueue`` hands its notification over and returns; a thread
of this process publishes it with publisher confirms and ``mandatory``, many in flight.

- ``submit(notes)`` (any thread) numbers the notifications in hand-off order and queues
  them: no broker I/O in the caller.
- The publisher thread (``sender.Sender``) owns the connection: it sends, settles confirms,
  re-sends after a nack, a return or a lost connection, and gives a notification up after
  ``publish_retry_for`` seconds with an ERROR log (``action=publish_failed``, ``job_id``)
  and the ``exception_reporter``; the sweeper then republishes the job from the database.
- ``flush(timeout)`` (any thread) waits until every notification handed off before the call
  is settled, confirmed or given up.

One publisher per process and broker (a forked child starts its own and never touches its
parent's); every publisher is flushed for a few seconds at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

from tomqueue import failpoints
from tomqueue.config import Config
from tomqueue.errors import PublishError
from tomqueue.message import Notification
from tomqueue.runtime import current_pid
from tomqueue.transport.sender import Entry, Sender

log = logging.getLogger("tomqueue.publisher")

EXIT_FLUSH = 5.0  # seconds the interpreter's exit waits for outstanding confirms
CLOSE_JOIN = 5.0
FAILURES_KEPT = 100_000  # given-up sequence numbers remembered for flush()'s answer


class BackgroundPublisher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._inbox: queue.SimpleQueue[list[Entry] | None] = queue.SimpleQueue()
        self._hand_lock = threading.Lock()  # hand-off order = sequence order
        self._next_seq = 1
        self._closed = False
        self._thread: threading.Thread | None = None
        self._state = threading.Condition()
        self._low = 1  # every sequence number below is settled
        self._taken = 0  # the highest sequence number the thread has taken
        self._open: dict[int, int] = {}  # taken, not settled: sequence number -> job id
        self._failed: list[int] = []
        self._failed_forgotten = 0  # failures at or below this were dropped from _failed

    # --- any thread ------------------------------------------------------------------------

    def submit(self, notes: Sequence[Notification]) -> None:
        """Hand notifications over for publishing (returns at once)."""
        now = time.monotonic()
        with self._hand_lock:
            if self._closed:
                raise PublishError("the background publisher is closed")
            first = self._next_seq
            self._next_seq += len(notes)
            self._start_thread()
            self._inbox.put([Entry(first + i, note, now) for i, note in enumerate(notes)])

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every notification handed off before this call is confirmed or given
        up. True if all of those still pending at the call were confirmed; False if one of
        them was given up or ``timeout`` passed first."""
        with self._hand_lock:
            target = self._next_seq - 1
        with self._state:
            low_at_call = self._low
            if not self._state.wait_for(lambda: self._low > target, timeout):
                return False
            if self._failed_forgotten >= low_at_call:
                return False
            return not any(low_at_call <= seq <= target for seq in self._failed)

    def close(self, timeout: float = CLOSE_JOIN) -> bool:
        """Flush for up to ``timeout`` seconds, then stop the thread; what is still
        unconfirmed is given up (logged, left to the sweeper). Returns ``flush``'s answer."""
        flushed = self.flush(timeout)
        with self._hand_lock:
            self._closed = True
            thread = self._thread
            if thread is not None and thread.is_alive():
                self._inbox.put(None)
        if thread is not None:
            thread.join(CLOSE_JOIN)
            if thread.is_alive():
                self._report_stuck()
        return flushed

    def _report_stuck(self) -> None:
        """The thread did not stop (stuck connecting to an unresponsive broker): name the
        jobs whose notifications it still holds, so none is lost without a word."""
        with self._state:
            job_ids = list(self._open.values())
        with contextlib.suppress(queue.Empty):
            while True:
                job_ids += [entry.note.job_id for entry in self._inbox.get_nowait() or []]
        for job_id in job_ids:
            log.error(
                "job %s committed but its notification was not confirmed before the "
                "publisher closed; the sweeper will republish it",
                job_id,
                extra={"action": "publish_failed", "job_id": job_id},
            )

    def _start_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        thread = threading.Thread(target=self._run, name="tomqueue-publisher", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # at interpreter shutdown no thread can start
            raise PublishError(f"cannot start the publisher thread: {exc}") from None
        self._thread = thread

    # --- the publisher thread --------------------------------------------------------------

    def _run(self) -> None:
        sender = Sender(self.config, self._settled)
        wait = 0.0
        try:
            while True:
                entries, stop = self._take(wait)
                if entries:
                    failpoints.hit("publisher.before_send")
                sender.add(entries)
                if stop:
                    break
                try:
                    wait = sender.step()
                except Exception as exc:  # a bug must not stop publishing: start over
                    log.exception("publisher thread error", extra={"action": "publish_error"})
                    sender.lost(exc)
                    wait = 0.1
        finally:
            sender.give_up_all("the publisher was closed before the broker confirmed it")

    def _take(self, wait: float) -> tuple[list[Entry], bool]:
        """What was handed off: waits up to ``wait`` seconds for the first batch."""
        batches: list[list[Entry] | None] = []
        with contextlib.suppress(queue.Empty):
            batches.append(self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait())
            while True:
                batches.append(self._inbox.get_nowait())
        entries = [entry for batch in batches if batch for entry in batch]
        if entries:
            with self._state:
                self._open.update((entry.seq, entry.note.job_id) for entry in entries)
                self._taken = max(self._taken, entries[-1].seq)
        return entries, None in batches

    def _settled(self, confirmed: list[Entry], given_up: list[Entry]) -> None:
        with self._state:
            for entry in confirmed:
                self._open.pop(entry.seq, None)
            for entry in given_up:
                self._open.pop(entry.seq, None)
                self._failed.append(entry.seq)
            if len(self._failed) > FAILURES_KEPT:
                half = len(self._failed) // 2
                self._failed_forgotten = max(self._failed_forgotten, *self._failed[:half])
                del self._failed[:half]
            while self._low <= self._taken and self._low not in self._open:
                self._low += 1
            self._state.notify_all()


# --- one per process -------------------------------------------------------------------------

Key = tuple[int, str | None, str]  # (process id, broker URL, prefix)
_publishers: dict[Key, BackgroundPublisher] = {}
_lock = threading.Lock()


def get_background_publisher(config: Config) -> BackgroundPublisher:
    """This process's background publisher for the config's broker and prefix (the first
    config that asks decides its other settings)."""
    key = (current_pid(), config.amqp_url, config.prefix)
    publisher = _publishers.get(key)  # no lock on the hot path: a dict read is atomic
    if publisher is not None:
        return publisher
    with _lock:
        publisher = _publishers.get(key)
        if publisher is None:
            publisher = _publishers[key] = BackgroundPublisher(config)
        return publisher


def _my_keys() -> list[Key]:
    """The keys of this process's publishers (hold ``_lock``)."""
    pid = current_pid()
    return [key for key in _publishers if key[0] == pid]


def _mine() -> list[BackgroundPublisher]:
    with _lock:
        return [_publishers[key] for key in _my_keys()]


def flush_background(timeout: float | None = None) -> bool:
    """``flush`` every background publisher of this process within one ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = True
    for publisher in _mine():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = publisher.flush(left) and ok
    return ok


def close_background(timeout: float = CLOSE_JOIN) -> None:
    """Close this process's background publishers (flushing each for up to ``timeout``)."""
    with _lock:
        closing = [_publishers.pop(key) for key in _my_keys()]
    for publisher in closing:
        publisher.close(timeout)


def _forget_parents() -> None:
    """In a forked child: the parent's publishers (their threads did not survive the fork)
    are the parent's business; drop them without touching their connections."""
    global _lock
    _lock = threading.Lock()
    _publishers.clear()


atexit.register(close_background, EXIT_FLUSH)
os.register_at_fork(after_in_child=_forget_parents)
