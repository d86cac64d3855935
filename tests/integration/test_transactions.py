"""Must-show 5: enqueue inside the caller's transaction.

``enqueue(obj, session=s)`` and ``enqueue(obj, connection=c)``: a rollback publishes nothing
(and leaves no row); a commit publishes exactly once, after the commit. On AMQP stacks the
messages are counted in ``<prefix>.balance.normal`` (after ``tomqueue.flush()``: enqueue
hands its notifications to a background publisher); on every stack the hand-off to the
publisher is observed too (the polling transport has no broker to count in).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

import tomqueue
from tests.conftest import Stack, declare_topology, drain_queue, job_count, run_threads
from tests.jobs import Record
from tomqueue.db import get_engine
from tomqueue.message import decode
from tomqueue.transport import get_background_publisher, get_publisher


class Published:
    """What the enqueue side handed to the transport, plus (AMQP) what reached the queue."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ids: list[int] = []
        self._lock = threading.Lock()

    def record(self, notes: object) -> None:
        with self._lock:
            self.ids.extend(n.job_id for n in notes)  # type: ignore[attr-defined]

    def in_queue(self) -> list[int]:
        """Job ids of the notifications waiting in <prefix>.balance.normal (consumed)."""
        if self.stack.transport != "amqp":
            return list(self.ids)  # no broker: the publisher call is the notification
        assert tomqueue.flush(30), "notifications were not confirmed"
        config = self.stack.config
        return [
            decode(b, h).job_id for b, h in drain_queue(config, f"{config.prefix}.balance.normal")
        ]


@pytest.fixture
def published(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Published]:
    if stack.transport == "amqp":
        declare_topology(stack.config)
    spy = Published(stack)
    if stack.transport == "amqp":  # enqueue hands notifications to the background publisher
        background = get_background_publisher(stack.config)
        original = background.submit

        def submit(notes: object) -> None:
            original(notes)  # type: ignore[arg-type]
            spy.record(notes)

        monkeypatch.setattr(background, "submit", submit)
    else:
        publisher = get_publisher(stack.config)
        publish_original = publisher.publish

        def publish(notes: object) -> None:
            publish_original(notes)  # type: ignore[arg-type]
            spy.record(notes)

        monkeypatch.setattr(publisher, "publish", publish)
    yield spy


def test_session_rollback_publishes_nothing(
    stack: Stack, published: Published, ledger_path: str
) -> None:
    with Session(get_engine(stack.config)) as session:
        job = tomqueue.enqueue(Record(ledger_path, "rolled-back"), session=session)
        assert job.id is not None
        session.rollback()
        # the session stays usable after the rollback
        kept_id = tomqueue.enqueue(Record(ledger_path, "kept"), session=session).id
        session.commit()
    assert job_count(stack.config) == 1
    assert published.in_queue() == [kept_id]


def test_session_commit_publishes_exactly_once(
    stack: Stack, published: Published, ledger_path: str
) -> None:
    with Session(get_engine(stack.config)) as session:
        ids = [
            tomqueue.enqueue(Record(ledger_path, "s1"), session=session).id,
            tomqueue.enqueue(Record(ledger_path, "s2"), session=session).id,
        ]
        assert published.ids == [], "published before the commit"
        assert published.in_queue() == []
        session.commit()
    assert job_count(stack.config) == 2
    assert sorted(published.in_queue()) == sorted(ids)
    assert sorted(published.ids) == sorted(ids)


def test_connection_rollback_publishes_nothing(
    stack: Stack, published: Published, ledger_path: str
) -> None:
    with get_engine(stack.config).connect() as conn, conn.begin() as txn:
        tomqueue.enqueue(Record(ledger_path, "c-rolled-back"), connection=conn)
        txn.rollback()
    assert job_count(stack.config) == 0
    assert published.in_queue() == []


def test_connection_commit_publishes_exactly_once(
    stack: Stack, published: Published, ledger_path: str
) -> None:
    with get_engine(stack.config).connect() as conn:
        with conn.begin():
            job = tomqueue.enqueue(Record(ledger_path, "c1"), connection=conn)
            assert published.ids == [], "published before the commit"
        # committed here
        with conn.begin():
            pass  # a later, empty transaction on the same connection publishes nothing more
    assert job_count(stack.config) == 1
    assert published.in_queue() == [job.id]


def test_session_savepoint_rollback_publishes_nothing(
    stack: Stack, published: Published, ledger_path: str
) -> None:
    with Session(get_engine(stack.config)) as session:
        outer_id = tomqueue.enqueue(Record(ledger_path, "outer"), session=session).id
        savepoint = session.begin_nested()
        tomqueue.enqueue(Record(ledger_path, "inner"), session=session)
        savepoint.rollback()
        session.commit()
    assert job_count(stack.config) == 1
    assert published.in_queue() == [outer_id]


def _concurrent(stack: Stack, ledger_path: str, use_session: bool) -> tuple[list[int], list[int]]:
    """8 threads x 4 transactions x 3 jobs; every other transaction rolls back."""
    engine = get_engine(stack.config)
    committed: list[int] = []
    rolled_back: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for n in range(4):
            keep = (t + n) % 2 == 0
            if use_session:
                with Session(engine) as session:
                    ids = [
                        tomqueue.enqueue(Record(ledger_path, f"{t}-{n}-{i}"), session=session).id
                        for i in range(3)
                    ]
                    session.commit() if keep else session.rollback()
            else:
                with engine.connect() as conn:
                    txn = conn.begin()
                    ids = [
                        tomqueue.enqueue(Record(ledger_path, f"{t}-{n}-{i}"), connection=conn).id
                        for i in range(3)
                    ]
                    txn.commit() if keep else txn.rollback()
            with lock:
                (committed if keep else rolled_back).extend(ids)

    errors = run_threads(8, work, 60)
    assert not errors, errors
    return committed, rolled_back


def _assert_exactly_committed(
    stack: Stack, published: Published, committed: list[int], rolled_back: list[int]
) -> None:
    assert len(committed) == 48
    assert job_count(stack.config) == 48
    seen = Counter(published.in_queue())
    assert set(seen) == set(committed), "published ids differ from committed ids"
    assert all(count == 1 for count in seen.values()), "a notification was published twice"
    assert Counter(published.ids) == Counter(committed)
    # Nothing for the rolled-back jobs: exactly one notification per committed job and no
    # other (ids are compared as a multiset; SQLite may reuse a rolled-back id).
    assert sum(seen.values()) == len(committed)
    assert len(rolled_back) == 48


def test_concurrent_sessions_publish_each_committed_job_once(
    stack: Stack, published: Published, ledger_path: str
) -> None:
    committed, rolled_back = _concurrent(stack, ledger_path, use_session=True)
    _assert_exactly_committed(stack, published, committed, rolled_back)


def test_concurrent_connections_publish_each_committed_job_once(
    stack: Stack, published: Published, ledger_path: str
) -> None:
    committed, rolled_back = _concurrent(stack, ledger_path, use_session=False)
    _assert_exactly_committed(stack, published, committed, rolled_back)
