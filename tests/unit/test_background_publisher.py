"""The background publisher's bookkeeping, without a broker: the thread's sender is replaced
by a fake that confirms notifications of even job ids and gives up odd ones, when a test
opens its gate. What is checked: hand-off order, ``flush`` (waits, times out, tells a
give-up apart), threads handing off at once, closing, and one publisher per process."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import datetime

import pytest

from tomqueue.config import Config
from tomqueue.errors import PublishError
from tomqueue.message import Notification
from tomqueue.transport import background
from tomqueue.transport.sender import Entry, Settle

CONFIG = Config(amqp_url="amqp://guest:guest@127.0.0.1:1/%2F", prefix="tunitbg")


class FakeSender:
    """Settles what it holds when the gate is open: even job ids confirmed, odd given up."""

    gate = threading.Event()
    seen: list[int] = []

    def __init__(self, config: Config, settle: Settle) -> None:
        self.settle = settle
        self.outbox: list[Entry] = []

    def add(self, entries: list[Entry]) -> None:
        self.outbox += entries
        FakeSender.seen += [e.seq for e in entries]

    def step(self) -> float:
        if not self.outbox or not FakeSender.gate.is_set():
            return 0.01
        held, self.outbox = self.outbox, []
        self.settle(
            [e for e in held if e.note.job_id % 2 == 0], [e for e in held if e.note.job_id % 2]
        )
        return 0.0

    def lost(self, exc: BaseException) -> None:
        pass

    def give_up_all(self, reason: str) -> None:
        held, self.outbox = self.outbox, []
        self.settle([], held)


@pytest.fixture
def publisher(monkeypatch: pytest.MonkeyPatch) -> Iterator[background.BackgroundPublisher]:
    monkeypatch.setattr(background, "Sender", FakeSender)
    FakeSender.gate.set()
    FakeSender.seen = []
    publisher = background.BackgroundPublisher(CONFIG)
    yield publisher
    FakeSender.gate.set()
    publisher.close(1)


def notes(*job_ids: int) -> list[Notification]:
    return [Notification(i, 1, datetime(2030, 1, 1)) for i in job_ids]


def test_flush_with_nothing_handed_off_is_true_at_once(
    publisher: background.BackgroundPublisher,
) -> None:
    assert publisher.flush(0) is True


def test_flush_waits_for_the_confirms_and_times_out_without_them(
    publisher: background.BackgroundPublisher,
) -> None:
    FakeSender.gate.clear()
    publisher.submit(notes(2, 4))
    assert publisher.flush(0.1) is False  # nothing settled yet
    FakeSender.gate.set()
    assert publisher.flush(5) is True


def test_a_given_up_notification_makes_flush_false_once(
    publisher: background.BackgroundPublisher,
) -> None:
    publisher.submit(notes(2, 3))
    assert publisher.flush(5) is False  # job 3 was given up
    publisher.submit(notes(4))
    assert publisher.flush(5) is True  # the give-up was before this flush was called


def test_concurrent_hand_offs_are_numbered_once_and_all_settled(
    publisher: background.BackgroundPublisher,
) -> None:
    barrier = threading.Barrier(8)

    def work(t: int) -> None:
        barrier.wait(5)
        for i in range(200):
            publisher.submit(notes(2 * (t * 1000 + i)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert publisher.flush(10) is True
    assert sorted(FakeSender.seen) == list(range(1, 1601))


def test_close_gives_up_what_is_left_and_refuses_new_hand_offs(
    publisher: background.BackgroundPublisher,
) -> None:
    FakeSender.gate.clear()
    publisher.submit(notes(2))
    assert publisher.close(0.1) is False
    assert not publisher._open  # given up by the closing thread (and logged by the sender)
    with pytest.raises(PublishError, match="closed"):
        publisher.submit(notes(4))


def test_one_publisher_per_process_and_config() -> None:
    first = background.get_background_publisher(CONFIG)
    try:
        assert background.get_background_publisher(CONFIG.replace(max_attempts=3)) is first
        assert background.get_background_publisher(CONFIG.replace(prefix="other")) is not first
        assert all(key[0] == os.getpid() for key in background._publishers)
    finally:
        background.close_background(0)
    assert not background._publishers
