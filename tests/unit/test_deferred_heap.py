"""The deferred heap's order (issue 3, req. 3): jobs due at the same instant leave most
urgent level first, and a batch found due together is released most urgent first."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from deferred.heap import RANK, TAG, DeferredHeap, level_rank, notification, to_us
from tomqueue.config import LEVELS
from tomqueue.message import Notification

PRIORITY_OF = {"high": -10, "normal": 0, "low": 1, "bulk": 10}
DUE = datetime(2031, 1, 1, 9, 0, 0)


def note(job_id: int, level: str, run_at: datetime = DUE) -> Notification:
    return Notification(job_id, 1, run_at, PRIORITY_OF[level], None, "t:Job")


def levels(entries: list[tuple]) -> list[str]:  # type: ignore[type-arg]
    return [LEVELS[e[RANK]] for e in entries]


def test_ties_on_run_at_leave_most_urgent_first_then_in_arrival_order() -> None:
    heap = DeferredHeap()
    arrivals = [*("bulk",) * 3, *("low",) * 3, *("normal",) * 3, *("high",) * 3]
    for tag, level in enumerate(arrivals, start=1):
        heap.push(note(tag, level), tag)
    out = heap.pop_due(to_us(DUE), 100)
    assert levels(out) == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3 + ["bulk"] * 3
    assert [e[TAG] for e in out[:3]] == [10, 11, 12], "first come, first served in a level"
    assert [notification(e).job_id for e in out] == [e[TAG] for e in out]


def test_a_due_batch_is_released_most_urgent_first_across_turns() -> None:
    """5,000 entries due within the same second (different microseconds), found due
    together: every turn of 100 takes the most urgent still waiting."""
    heap = DeferredHeap()
    order = ["bulk"] * 1250 + ["low"] * 1250 + ["normal"] * 1250 + ["high"] * 1250
    for tag, level in enumerate(order, start=1):
        heap.push(note(tag, level, DUE + timedelta(microseconds=random.randrange(1_000_000))), tag)
    now = to_us(DUE + timedelta(seconds=1))
    released: list[str] = []
    while batch := heap.pop_due(now, 100):
        released += levels(batch)
    assert released == ["high"] * 1250 + ["normal"] * 1250 + ["low"] * 1250 + ["bulk"] * 1250
    assert len(heap) == 0 and heap.next_due_us() is None


def test_entries_not_yet_due_stay_and_next_due_counts_the_unreleased_batch() -> None:
    heap = DeferredHeap()
    heap.push(note(1, "bulk", DUE), 1)
    heap.push(note(2, "high", DUE + timedelta(seconds=1)), 2)
    heap.push(note(3, "low", DUE - timedelta(seconds=1)), 3)
    assert heap.next_due_us() == to_us(DUE - timedelta(seconds=1))
    [first] = heap.pop_due(to_us(DUE), 1)  # two due: low and bulk; one released
    assert LEVELS[first[RANK]] == "low"
    assert len(heap) == 2 and heap.next_due_us() == to_us(DUE), "the bulk one is still held"
    taken = heap.take_tags_up_to(1)  # a refresh takes the due-but-unreleased one too
    assert [e[TAG] for e in taken] == [1]
    assert heap.next_due_us() == to_us(DUE + timedelta(seconds=1))
    assert [e[TAG] for e in heap.take_all()] == [2] and len(heap) == 0


def test_the_rank_follows_the_configured_priority_map() -> None:
    rank = level_rank({5: "high", -5: "bulk"})
    assert (rank(5), rank(-5), rank(0), rank(123)) == (0, 3, 1, 1)
    heap = DeferredHeap(rank)
    heap.push(Notification(1, 1, DUE, -5), 1)
    heap.push(Notification(2, 1, DUE, 5), 2)
    assert [e[TAG] for e in heap.pop_due(to_us(DUE), 10)] == [2, 1]
