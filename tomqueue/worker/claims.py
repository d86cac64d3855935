"""Which job ids each locker thread of a worker is locking right now."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager


class Claims:
    """A worker's locker threads lock disjoint sets of job ids at a time: a thread whose
    batch shares an id with a sibling's waits until the sibling has locked its jobs and
    registered them in ``running_jobs``; batches with no id in common lock concurrently.

    Needed where the lock statement reads its rows back by the worker's name (MySQL, see
    ``hot_sql``): two lockers holding copies of one notification would otherwise both read
    the row back as theirs and both run the job. Elsewhere (``exclusive=False``) it costs
    nothing."""

    def __init__(self, exclusive: bool) -> None:
        self.exclusive = exclusive
        self._held: set[int] = set()
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, ids: Collection[int]) -> Iterator[None]:
        if not self.exclusive:
            yield
            return
        wanted = set(ids)
        with self._changed:
            self._changed.wait_for(lambda: not self._held & wanted)
            self._held |= wanted
        try:
            yield
        finally:
            with self._changed:
                self._held -= wanted
                self._changed.notify_all()
