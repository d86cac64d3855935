"""Locker threads of one worker: batches sharing a job id lock one after the other,
disjoint batches at the same time (``tomqueue/worker/claims.py``)."""

from __future__ import annotations

import threading

from tomqueue.worker.claims import Claims


def test_a_batch_sharing_an_id_waits_for_the_sibling_holding_it() -> None:
    claims = Claims(exclusive=True)
    entered = threading.Event()
    with claims.hold({1, 2}):
        def second() -> None:
            with claims.hold({2, 3}):
                entered.set()

        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.2)  # id 2 is held
    assert entered.wait(5)  # released: the sibling goes on
    thread.join(5)


def test_disjoint_batches_lock_at_the_same_time() -> None:
    claims = Claims(exclusive=True)
    entered = threading.Event()

    def second() -> None:
        with claims.hold({3, 4}):
            entered.set()

    with claims.hold({1, 2}):
        thread = threading.Thread(target=second)
        thread.start()
        assert entered.wait(5)
    thread.join(5)


def test_not_exclusive_never_waits() -> None:
    claims = Claims(exclusive=False)
    with claims.hold({1}), claims.hold({1}):
        pass
