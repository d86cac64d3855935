"""`tomqueue status`: a heartbeat written just after the report read the clock is 0 s old."""

from __future__ import annotations

from datetime import datetime, timedelta

from tomqueue.status import _seconds_ago

NOW = datetime(2026, 12, 6, 23, 0, 0)


def test_a_heartbeat_written_after_the_reports_clock_reading_is_zero_seconds_old() -> None:
    age = _seconds_ago(NOW, NOW + timedelta(milliseconds=40))
    assert age == 0.0 and f"{age:.0f}s" == "0s"


def test_an_older_heartbeat_keeps_its_age() -> None:
    assert _seconds_ago(NOW, NOW - timedelta(seconds=2.34)) == 2.3
