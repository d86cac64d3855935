"""Group commit: job threads that reach the database at the same moment share one
transaction.

The first thread to arrive becomes the *leader* and runs a batch made of every request
waiting at that moment (its own included); the others wait for their result. When the
leader's batch is done and more requests have queued up meanwhile, the oldest waiting thread
is promoted to lead the next batch. An idle worker therefore pays no latency (a batch of
one); a busy one does one commit for many jobs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("error", "event", "item", "promoted", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.event = threading.Event()
        self.promoted = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``submit(item)`` returns ``run_batch([... item ...])[i]`` for that item.

    ``run_batch`` must return one result per item, in order; if it raises, every item of
    that batch gets the exception."""

    def __init__(self, run_batch: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 64):
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Slot[T, R]] = []
        self._leading = False

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            lead = not self._leading
            self._leading = True
        if not lead:
            slot.event.wait()
            if not slot.promoted:
                return self._outcome(slot)
            slot.event.clear()
        self._lead()
        slot.event.wait()
        return self._outcome(slot)

    def _lead(self) -> None:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        try:
            results = self._run_batch([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError("run_batch returned a wrong number of results")
            for s, r in zip(batch, results, strict=True):
                s.result = r
        except BaseException as exc:  # handed to every waiting thread
            for s in batch:
                s.error = exc
        with self._lock:
            if self._pending:
                successor = self._pending[0]
                successor.promoted = True
                successor.event.set()
            else:
                self._leading = False
        for s in batch:
            s.promoted = False
            s.event.set()

    @staticmethod
    def _outcome(slot: _Slot[T, R]) -> R:
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]
