"""Group commit: job threads that reach the database at the same moment share one
transaction.

A thread that arrives while fewer than ``leaders`` batches are in flight takes a *lead
token* and runs a batch made of every request waiting at that moment (usually its own
included); the others wait for their result. A leader that finishes while requests are
still waiting hands its token to the oldest of them, so the number of batches in flight
never exceeds ``leaders`` and no request waits without a leader coming for it. An idle
worker pays no latency (a batch of one); a busy one does one commit for many jobs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("done", "error", "event", "item", "result", "token")

    def __init__(self, item: T) -> None:
        self.item = item
        self.event = threading.Event()
        self.token = False  # this thread must run a batch (it holds a lead token)
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``submit(item)`` returns ``run_batch([... item ...])[i]`` for that item.

    ``run_batch`` must return one result per item, in order; if it raises, every item of
    that batch gets the exception."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[T]], Sequence[R]],
        max_batch: int = 64,
        leaders: int = 2,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_leaders = leaders  # batches in flight at once: round trips overlap
        self._lock = threading.Lock()
        self._pending: list[_Slot[T, R]] = []
        self._leaders = 0

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            if self._leaders < self._max_leaders:
                self._leaders += 1
                slot.token = True
        while True:
            if slot.token:
                slot.token = False
                self._lead()
            if slot.done:
                if slot.error is not None:
                    raise slot.error
                return slot.result  # type: ignore[return-value]
            slot.event.wait()
            slot.event.clear()

    def _lead(self) -> None:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        if batch:
            self._run(batch)
        with self._lock:
            if self._pending:  # hand the token on: someone is waiting
                successor = self._pending[0]
                successor.token = True
                successor.event.set()
            else:
                self._leaders -= 1
        for s in batch:
            s.done = True
            s.event.set()

    def _run(self, batch: list[_Slot[T, R]]) -> None:
        try:
            results = self._run_batch([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError("run_batch returned a wrong number of results")
            for s, r in zip(batch, results, strict=True):
                s.result = r
        except BaseException as exc:  # handed to every waiting thread
            for s in batch:
                s.error = exc
