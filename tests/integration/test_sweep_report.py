"""Issue 4 item 3, "its delay is configurable and reported": every sweep reports how late the
jobs it republished were (now - run_at) and how long they had gone unnotified
(now - notified_at), in its log line, as metrics and in ``tomqueue status``; the worker
holding the sweeper lease sets the queue lag gauge."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import delete, update

import tomqueue
from tests.conftest import AMQP_STACKS, Stack, all_queue_names, drain_queue, on_stacks
from tests.jobs import Record
from tomqueue.db import db_now, get_engine
from tomqueue.schema import Job
from tomqueue.status import collect
from tomqueue.status_table import render
from tomqueue.sweeper import PeriodicSweeper


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def age_jobs(stack: Stack, ages: list[tuple[int, float, float | None]]) -> None:
    """(job id, seconds since run_at, seconds since notified_at or None)."""
    with get_engine(stack.config).begin() as conn:
        now = db_now(conn)
        for job_id, late, notified in ages:
            notified_at = None if notified is None else now - timedelta(seconds=notified)
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(run_at=now - timedelta(seconds=late), notified_at=notified_at)
            )


@on_stacks(("sqlite", "polling"), *AMQP_STACKS[1:])
def test_each_sweep_reports_how_late_its_republished_jobs_were(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tomqueue.sweeper")
    old, unnotified, fresh = (tomqueue.enqueue(Record(ledger_path, k)) for k in "abc")
    age_jobs(stack, [(old.id, 100, 70), (unnotified.id, 50, None), (fresh.id, 10, 1)])
    if stack.config.uses_broker:  # the notifications were lost: nothing in the queues
        for name in all_queue_names(stack.config):
            drain_queue(stack.config, name)
    late_before = sample("tomqueue_sweep_lateness_seconds_count")
    quiet_before = sample("tomqueue_sweep_since_notified_seconds_count")
    sweeper = PeriodicSweeper(stack.config, "sweeper-under-test")

    assert sweeper.sweep_once() == 2

    [line] = [r for r in caplog.records if getattr(r, "action", "") == "sweep"]
    assert line.republished == 2  # type: ignore[attr-defined]
    assert 100 <= line.lateness < 110 and 70 <= line.since_notified < 80  # type: ignore[attr-defined]
    assert "past its run_at" in line.getMessage() and line.duration >= 0  # type: ignore[attr-defined]
    assert sample("tomqueue_sweep_lateness_seconds_count") - late_before == 2
    assert sample("tomqueue_sweep_since_notified_seconds_count") - quiet_before == 1
    lag = sample("tomqueue_queue_lag_seconds", queue="balance", level="normal")
    assert 100 <= lag < 110, "the oldest ready job's age"

    report = collect(stack.config)["last_sweep"]
    assert report["holder"] == "sweeper-under-test" and report["republished"] == 2
    assert 100 <= report["lateness_seconds"] < 110
    assert 70 <= report["since_notified_seconds"] < 80 and 0 <= report["seconds_ago"] < 10
    table = render(collect(stack.config))
    assert "last sweep " in table and "by sweeper-under-test: republished 2" in table

    assert sweeper.sweep_once() == 0, "notified just now"
    nothing = collect(stack.config)["last_sweep"]
    assert nothing["republished"] == 0 and nothing["lateness_seconds"] is None
    with get_engine(stack.config).begin() as conn:
        conn.execute(delete(Job))
    sweeper.sweep_once()
    assert sample("tomqueue_queue_lag_seconds", queue="balance", level="normal") == 0
