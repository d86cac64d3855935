"""What the deferred manager holds: unacked deliveries ordered by ``run_at``, then urgency.

An entry is a plain tuple, small enough to hold 100,000 jobs in well under 300 bytes each::

    (run_at_us, rank, delivery_tag, job_id, version, meta)

- ``run_at_us``: ``run_at`` as integer microseconds since the Unix epoch (UTC). Exact: the
  wire format has microsecond precision, so the notification is rebuilt bit for bit.
- ``rank``: the priority level's index in ``LEVELS`` (0 = high ... 3 = bulk), through the
  configured ``priority_map``: jobs due at the same instant leave most urgent first.
- ``delivery_tag``: the broker's tag on the consuming channel. Tags grow in arrival order
  and are unique on that channel, so ``(run_at_us, rank, delivery_tag)`` orders entries
  totally (ties: first come, first served) and the tuple comparison never looks further.
  ``0`` means "nothing to acknowledge" (a salvaged copy, see ``manager``).
- ``job_id``, ``version``: the notification's identity.
- ``meta``: ``(priority, queue, kind, traceparent)``, interned: the thousands of jobs of one
  class share one tuple (the traceparent is "" unless the application traces its enqueues
  with OpenTelemetry; then each job has its own, about 150 bytes more).

**Due batches.** When the manager wakes, everything due by then moves to a second heap
ordered by ``(rank, run_at_us, delivery_tag)``, and each turn publishes from that one: a
burst of jobs that fell due together (a backlog after a pause, jobs due within the same
few milliseconds) is released most urgent first, not in ``run_at`` order.

Measured by ``bench/deferred_memory.py`` at 100,000 held: about 184 bytes per entry with
tracemalloc (tuple, three ints, a shared small int, the list slot, shared ``meta``).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Final

from tomqueue.config import DEFAULT_PRIORITY_MAP, LEVELS
from tomqueue.message import Notification

Meta = tuple[int, str | None, str, str]
Entry = tuple[int, int, int, int, int, Meta]
Rank = Callable[[int], int]

EPOCH = datetime(1970, 1, 1)
_ONE_US = timedelta(microseconds=1)
_MAX_INTERNED = 10_000

RUN_AT: Final = 0  # index of run_at_us in an entry
RANK: Final = 1  # index of the priority level's rank
TAG: Final = 2  # index of the delivery tag


def level_rank(priority_map: Mapping[int, str] = DEFAULT_PRIORITY_MAP) -> Rank:
    """priority → index of its level in ``LEVELS`` (unmapped priorities are normal)."""
    ranks = {priority: LEVELS.index(level) for priority, level in priority_map.items()}
    normal = LEVELS.index("normal")
    return lambda priority: ranks.get(priority, normal)


def to_us(when: datetime) -> int:
    """Naive UTC datetime → integer microseconds since the epoch (exact)."""
    return (when - EPOCH) // _ONE_US


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def notification(entry: Entry) -> Notification:
    """The notification an entry stands for."""
    run_at_us, _rank, _tag, job_id, version, (priority, queue, kind, trace) = entry
    return Notification(job_id, version, from_us(run_at_us), priority, queue, kind, trace)


class DeferredHeap:
    """Entries not yet due in a binary heap by ``(run_at, rank, tag)``; entries found due
    in a second heap by ``(rank, run_at, tag)`` (owner thread only).

    ``len()`` and ``next_due_us()`` read a few attributes and may be called from another
    thread for status reporting.
    """

    def __init__(self, rank: Rank | None = None) -> None:
        self._heap: list[Entry] = []
        self._due: list[tuple[int, Entry]] = []
        self._due_since: int | None = None  # earliest run_at among the due entries
        self._metas: dict[Meta, Meta] = {}
        self._rank = rank or level_rank()

    def __len__(self) -> int:
        return len(self._heap) + len(self._due)

    def push(self, note: Notification, tag: int) -> None:
        meta: Meta = (note.priority, note.queue, note.kind, note.trace)
        shared = self._metas.get(meta)
        if shared is None:
            if len(self._metas) < _MAX_INTERNED and not note.trace:
                self._metas[meta] = meta
            shared = meta
        rank = self._rank(note.priority)
        entry = (to_us(note.run_at), rank, tag, note.job_id, note.version, shared)
        heapq.heappush(self._heap, entry)

    def next_due_us(self) -> int | None:
        """The earliest ``run_at`` held (due entries not yet released included)."""
        due_since, heap = self._due_since, self._heap
        try:
            first = heap[0][RUN_AT] if heap else None
        except IndexError:  # emptied by the owner thread meanwhile
            first = None
        if due_since is not None and (first is None or due_since < first):
            return due_since
        return first

    def pop_due(self, now_us: int, limit: int) -> list[Entry]:
        """Remove and return up to ``limit`` entries due at ``now_us``, most urgent level
        first, then earliest ``run_at``, then first arrived."""
        heap, due = self._heap, self._due
        while heap and heap[0][RUN_AT] <= now_us:
            entry = heapq.heappop(heap)
            if not due:
                self._due_since = entry[RUN_AT]
            heapq.heappush(due, (entry[RANK], entry))
        out = [heapq.heappop(due)[1] for _ in range(min(limit, len(due)))]
        if out:
            self._due_since = min((entry[RUN_AT] for _rank, entry in due), default=None)
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
        due_taken = [pair for pair in self._due if pair[1][TAG] <= last_tag]
        if due_taken:
            self._due = [pair for pair in self._due if pair[1][TAG] > last_tag]
            heapq.heapify(self._due)
            taken += [entry for _rank, entry in due_taken]
            self._due_since = min((e[RUN_AT] for _r, e in self._due), default=None)
        taken.sort()
        return taken

    def take_all(self) -> list[Entry]:
        entries = sorted([*self._heap, *(entry for _rank, entry in self._due)])
        self._heap, self._due, self._due_since = [], [], None
        return entries

    def clear(self) -> None:
        self._heap, self._due, self._due_since = [], [], None
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
