"""What the deferred manager holds: unacked deliveries ordered by ``run_at``.

An entry is a plain tuple, small enough to hold 100,000 jobs in well under 300 bytes each::

    (run_at_us, delivery_tag, job_id, version, meta)

- ``run_at_us``: ``run_at`` as integer microseconds since the Unix epoch (UTC). Exact: the
  wire format has microsecond precision, so the notification is rebuilt bit for bit.
- ``delivery_tag``: the broker's tag on the consuming channel. Unique on that channel, so
  ``(run_at_us, delivery_tag)`` orders entries totally and the tuple comparison never looks
  further. ``0`` means "nothing to acknowledge" (a salvaged copy, see ``manager``).
- ``job_id``, ``version``: the notification's identity.
- ``meta``: ``(priority, queue, kind)``, interned: the thousands of jobs of one class share
  one tuple.

Measured by ``bench/deferred_memory.py`` at 100,000 held: 176 bytes per entry with
tracemalloc (tuple, three ints, the list slot, shared ``meta``), 190 bytes of process RSS.
"""

from __future__ import annotations

import heapq
from collections import deque
from datetime import datetime, timedelta
from typing import Final

from tomqueue.message import Notification

Meta = tuple[int, str | None, str]
Entry = tuple[int, int, int, int, Meta]

EPOCH = datetime(1970, 1, 1)
_ONE_US = timedelta(microseconds=1)
_MAX_INTERNED = 10_000

RUN_AT: Final = 0  # index of run_at_us in an entry
TAG: Final = 1  # index of the delivery tag


def to_us(when: datetime) -> int:
    """Naive UTC datetime → integer microseconds since the epoch (exact)."""
    return (when - EPOCH) // _ONE_US


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def notification(entry: Entry) -> Notification:
    """The notification an entry stands for."""
    run_at_us, _tag, job_id, version, (priority, queue, kind) = entry
    return Notification(job_id, version, from_us(run_at_us), priority, queue, kind)


class DeferredHeap:
    """A binary heap of entries, earliest ``run_at`` first (owner thread only).

    ``len()`` and ``next_due_us()`` are single C-level list reads and may be called from
    another thread for status reporting.
    """

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._metas: dict[Meta, Meta] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, note: Notification, tag: int) -> None:
        meta: Meta = (note.priority, note.queue, note.kind)
        shared = self._metas.get(meta)
        if shared is None:
            if len(self._metas) < _MAX_INTERNED:
                self._metas[meta] = meta
            shared = meta
        heapq.heappush(self._heap, (to_us(note.run_at), tag, note.job_id, note.version, shared))

    def next_due_us(self) -> int | None:
        heap = self._heap
        return heap[0][RUN_AT] if heap else None

    def pop_due(self, now_us: int, limit: int) -> list[Entry]:
        """Remove and return up to ``limit`` entries due at ``now_us``, earliest first."""
        heap = self._heap
        out: list[Entry] = []
        while heap and len(out) < limit and heap[0][RUN_AT] <= now_us:
            out.append(heapq.heappop(heap))
        return out

    def take_tags_up_to(self, last_tag: int) -> list[Entry]:
        """Remove and return every entry whose delivery tag is ``<= last_tag`` (O(n))."""
        keep: list[Entry] = []
        taken: list[Entry] = []
        for entry in self._heap:
            (taken if entry[TAG] <= last_tag else keep).append(entry)
        if taken:
            heapq.heapify(keep)
            self._heap = keep
        taken.sort()
        return taken

    def take_all(self) -> list[Entry]:
        entries, self._heap = sorted(self._heap), []
        return entries

    def clear(self) -> None:
        self._heap = []
        self._metas.clear()


class Arrivals:
    """When deliveries arrived, in coarse buckets of delivery tags.

    Tags grow in arrival order on a channel, so a bucket ``(first arrival, last tag)`` says
    "every tag up to ``last tag`` (and after the previous bucket's) arrived at or after
    ``first arrival``". That costs a few dozen tuples instead of a timestamp per entry.
    """

    def __init__(self, granularity: float) -> None:
        self.granularity = granularity
        self._buckets: deque[tuple[float, int]] = deque()

    def note(self, tag: int, now: float) -> None:
        buckets = self._buckets
        if buckets and now - buckets[-1][0] < self.granularity:
            buckets[-1] = (buckets[-1][0], tag)
        else:
            buckets.append((now, tag))

    def oldest(self) -> float | None:
        """Arrival time of the oldest bucket still tracked."""
        return self._buckets[0][0] if self._buckets else None

    def pop_older_than(self, cutoff: float) -> int | None:
        """Forget buckets that began before ``cutoff``; the last tag they covered."""
        last: int | None = None
        buckets = self._buckets
        while buckets and buckets[0][0] <= cutoff:
            last = buckets.popleft()[1]
        return last

    def clear(self) -> None:
        self._buckets.clear()
