"""The error-handling layer: a lock conflict between workers (a deadlock's victim, a
serialization failure) gives the deliveries back at once with a warning; anything else is
an internal error, logged with its traceback, reported, and given back after a backoff."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from tomqueue import Config
from tomqueue.transport.base import Delivery
from tomqueue.worker import error_handling
from tomqueue.worker.work import Batch, Context, Work


class DriverError(Exception):
    def __init__(self, *args: Any, sqlstate: str | None = None) -> None:
        super().__init__(*args)
        self.sqlstate = sqlstate


class Consumer:
    def __init__(self) -> None:
        self.requeued: list[Delivery] = []

    def requeue(self, delivery: Delivery) -> None:
        self.requeued.append(delivery)


def make_batch(reported: list[BaseException]) -> tuple[Batch, Consumer]:
    consumer = Consumer()
    config = Config(exception_reporter=reported.append)
    ctx = Context(config, None, consumer, frozenset(), "unit")  # type: ignore[arg-type]
    return [Work(ctx, Delivery(b"", "normal")) for _ in range(3)], consumer


def failing(exc: Exception) -> Any:
    def call_next(_batch: Batch) -> None:
        raise exc

    return call_next


CONFLICTS = [
    DriverError("deadlock detected", sqlstate="40P01"),
    DriverError("could not serialize access", sqlstate="40001"),
    DriverError(1213, "Deadlock found when trying to get lock; try restarting transaction"),
]


@pytest.mark.parametrize("driver_error", CONFLICTS, ids=["pg-deadlock", "pg-serial", "mysql"])
def test_a_lock_conflict_gives_the_deliveries_back_at_once_with_a_warning(
    driver_error: Exception, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(error_handling.time, "sleep", slept.append)
    reported: list[BaseException] = []
    batch, consumer = make_batch(reported)
    exc = OperationalError("UPDATE delayed_jobs ...", {}, driver_error)
    with caplog.at_level(logging.INFO, logger="tomqueue.worker"):
        error_handling.enter(batch, failing(exc))
    assert consumer.requeued == [work.delivery for work in batch]
    assert all(work.requeued for work in batch)
    assert batch[0].ctx.counters == {"lock_conflict": 1}
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert getattr(record, "action", None) == "lock_conflict"
    assert "lock conflict with another worker while taking jobs" in record.getMessage()
    assert slept == [] and reported == []


def test_any_other_error_is_an_internal_error_with_its_traceback(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(error_handling.time, "sleep", slept.append)
    reported: list[BaseException] = []
    batch, consumer = make_batch(reported)
    exc = OperationalError("UPDATE delayed_jobs ...", {}, DriverError("server closed", "08006"))
    with caplog.at_level(logging.INFO, logger="tomqueue.worker"):
        error_handling.leave(batch, failing(exc))
    assert consumer.requeued == [work.delivery for work in batch]
    assert batch[0].ctx.counters == {"internal_error": 1}
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert slept == [error_handling.BACKOFF_SECONDS] and reported == [exc]
