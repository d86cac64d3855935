"""A worker's last try at outcomes it could not write (``db_lock.record_at_exit``)."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from tomqueue.worker import db_lock


def context(*job_ids: int) -> Any:
    released: list[bool] = []
    published: list[object] = []
    return SimpleNamespace(
        unrecorded=[SimpleNamespace(job=SimpleNamespace(id=i)) for i in job_ids],
        lock=threading.Lock(),
        release_connection=lambda: released.append(True),
        released=released,
        consumer=SimpleNamespace(publish=lambda notes: published.extend(notes)),
        published=published,
    )


def test_outcomes_still_unwritten_at_exit_are_named_in_one_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unreachable(pending: object) -> None:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(db_lock, "_record", unreachable)
    ctx = context(7, 3)
    with caplog.at_level(logging.WARNING, logger="tomqueue.worker"):
        db_lock.record_at_exit(ctx)
    assert ctx.released == [True]
    assert [w.job.id for w in ctx.unrecorded] == [7, 3]  # kept: they run after the lease
    lost = [r for r in caplog.records if getattr(r, "action", None) == "outcome_lost"]
    assert len(lost) == 1 and lost[0].levelno == logging.ERROR
    assert "2 outcome(s) unwritten (jobs [3, 7])" in lost[0].getMessage()


def test_outcomes_written_at_exit_leave_nothing_to_report(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    written: list[object] = []
    monkeypatch.setattr(db_lock, "_record", lambda pending: written.append(pending) or [["n"]])
    ctx = context(5)
    with caplog.at_level(logging.INFO, logger="tomqueue.worker"):
        db_lock.record_at_exit(ctx)
    assert len(written) == 1 and ctx.unrecorded == [] and ctx.released == [True]
    assert ctx.published == ["n"]  # the follow-up notifications of what was written
    assert not [r for r in caplog.records if getattr(r, "action", None) == "outcome_lost"]


def test_nothing_unwritten_touches_no_connection() -> None:
    ctx = context()
    db_lock.record_at_exit(ctx)
    assert ctx.released == []
