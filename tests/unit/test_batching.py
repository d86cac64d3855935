"""GroupCommit: concurrent submitters share batches; results and errors go to the right
caller; an idle caller is served alone at once."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from tomqueue.worker.batching import GroupCommit


def test_single_caller_is_a_batch_of_one() -> None:
    batches: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        return [i * 2 for i in items]

    gc = GroupCommit(run)
    assert gc.submit(3) == 6
    assert gc.submit(4) == 8
    assert batches == [[3], [4]]


def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []
    gate = threading.Event()

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        gate.wait(5)  # hold the first batch so the others pile up behind it
        return [i * 10 for i in items]

    gc = GroupCommit(run)
    results: dict[int, int] = {}

    def call(i: int) -> None:
        results[i] = gc.submit(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    while sum(len(b) for b in batches) == 0:
        pass
    gate.set()
    for t in threads:
        t.join(10)
    assert results == {i: i * 10 for i in range(20)}
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert len(batches) < 20  # some calls were batched together


def test_an_error_reaches_every_caller_of_that_batch_and_the_next_batch_still_runs() -> None:
    calls = {"n": 0}

    def run(items: Sequence[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("database went away")
        return list(items)

    gc = GroupCommit(run)
    with pytest.raises(ValueError):
        gc.submit(1)
    assert gc.submit(2) == 2


def test_wrong_result_count_is_an_error_not_a_hang() -> None:
    gc: GroupCommit[int, int] = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError):
        gc.submit(1)


@pytest.mark.parametrize("leaders", [1, 2, 4])
def test_many_threads_many_rounds_no_lost_wakeups(leaders: int) -> None:
    import random
    import time

    def run(items: Sequence[int]) -> list[int]:
        time.sleep(random.random() / 2000)
        return [i + 1 for i in items]

    gc = GroupCommit(run, max_batch=7, leaders=leaders)
    errors: list[str] = []

    def call(base: int) -> None:
        for i in range(200):
            n = base * 1000 + i
            if gc.submit(n) != n + 1:
                errors.append(f"wrong result for {n}")

    threads = [threading.Thread(target=call, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a submitter never got its result"
    assert errors == []
