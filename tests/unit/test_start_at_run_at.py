"""A job locked before its ``run_at`` (the deferred manager releases jobs ``release_ahead``
early; a notification may arrive a little early) starts at its ``run_at``, never before:
when this host's clock says so, kept within what the database clock allows."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tomqueue import Config
from tomqueue.schema import Job
from tomqueue.transport.base import Delivery
from tomqueue.worker import locking, timeout
from tomqueue.worker.outcome import Released
from tomqueue.worker.work import Context, StartAt, Work


def make_work() -> Work:
    ctx = Context(Config(), None, None, frozenset(), "unit")  # type: ignore[arg-type]
    return Work(ctx, Delivery(b"", "normal"))


def test_the_start_is_the_run_at_by_this_hosts_clock_when_the_database_agrees() -> None:
    now = time.monotonic()
    start = StartAt(earliest=now + 0.4, latest=now + 0.6, run_at=time.time() + 0.5)
    assert 0.49 < start.seconds_left() <= 0.5


def test_a_host_clock_off_by_more_than_the_lock_round_trip_does_not_decide() -> None:
    now = time.monotonic()
    behind = StartAt(earliest=now + 0.1, latest=now + 0.102, run_at=time.time() + 5)
    ahead = StartAt(earliest=now + 0.1, latest=now + 0.102, run_at=time.time() - 5)
    assert 0.09 < ahead.seconds_left() <= 0.1  # never before the database's earliest
    assert 0.09 < behind.seconds_left() <= 5  # wait again after it, until ...
    time.sleep(0.103)
    assert behind.seconds_left() == 0  # ... the database's latest: not 5 s late


def test_a_locked_job_waits_for_its_run_at_by_the_wall_clock() -> None:
    work = make_work()
    now = time.monotonic()
    work.start_at = StartAt(now, now + 1, time.time() + 0.05)
    assert timeout._due(work)
    assert time.time() >= work.start_at.run_at
    assert work.started >= now + 0.04  # its run time is counted from its start


def test_a_job_waiting_for_its_run_at_is_released_when_the_worker_stops() -> None:
    work = make_work()
    now = time.monotonic()
    work.start_at = StartAt(now + 30, now + 30, time.time() + 30)
    work.ctx.stopping.set()
    called: list[Work] = []
    timeout.layer(work, called.append)
    assert called == [] and time.monotonic() - now < 1
    assert isinstance(work.outcome, Released)


def test_the_lock_sets_a_start_only_for_a_job_not_yet_due() -> None:
    for due_in, waits in ((0.3, True), (-0.3, False)):
        work = make_work()
        locked_at = datetime.now(UTC).replace(tzinfo=None)
        work.job = Job(id=1, run_at=locked_at + timedelta(seconds=due_in))
        work.locked_at = locked_at
        sent = time.monotonic()
        locking._after_lock(work, sent)
        assert (work.start_at is not None) is waits
        if work.start_at is not None:
            assert work.start_at.earliest == sent + 0.3
            assert work.start_at.latest == work.started + 0.3
