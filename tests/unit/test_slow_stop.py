"""A worker slow to stop says where its threads are: identical stacks once, with their
count; one WARNING with ``action=slow_stop``."""

from __future__ import annotations

import logging
import threading

import pytest

from tomqueue.worker import slow_stop


def park(release: threading.Event) -> None:
    release.wait(10)


def test_identical_stacks_are_grouped_and_named() -> None:
    release = threading.Event()
    threads = [
        threading.Thread(target=park, args=(release,), name=f"tomqueue-job-{i}") for i in range(7)
    ]
    for thread in threads:
        thread.start()
    try:
        text = slow_stop.thread_stacks()
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert "--- 7 thread(s): tomqueue-job-0" in text and ", ..." in text
    assert text.count("in park") == 1
    assert "MainThread" not in text  # the reporting thread leaves itself out


def test_report_is_one_warning_with_the_counts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "tomqueue.worker"):
        slow_stop.report(12.3, 2, 1)
    (record,) = caplog.records
    assert record.action == "slow_stop"  # type: ignore[attr-defined]
    assert "after 12 s: 2 job place(s) busy, 1 outcome(s)" in record.getMessage()
