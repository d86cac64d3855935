"""A worker slow to stop says where its threads are: identical stacks once, with their
count; one WARNING with ``action=slow_stop``. One that cannot drain gives up (one ERROR,
``action=stop_gave_up``) instead of waiting for a supervisor's SIGKILL, and its pipeline
waits for all its threads together."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest

from tomqueue.config import Config
from tomqueue.worker import pipeline as pipeline_module
from tomqueue.worker import slow_stop
from tomqueue.worker.pipeline import Pipeline
from tomqueue.worker.process import Worker
from tomqueue.worker.work import Context


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


class NeverIdle:
    """A pipeline with one job place that never frees up (a job thread stuck in C code,
    or a database call that never returns)."""

    stopped = False
    watchdog = SimpleNamespace(poke=lambda: None)

    def idle(self) -> bool:
        return False

    def load(self) -> tuple[int, int]:
        return 1, 0

    def stop(self) -> None:
        self.stopped = True


class QuietConsumer:
    closed = False

    def wake(self) -> None:
        return None

    def poll(self, wait: float, _limit: int) -> list[object]:
        time.sleep(min(wait, 0.01))
        return []

    def close(self) -> None:
        self.closed = True


def test_a_worker_that_cannot_drain_gives_up_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slow_stop, "GIVE_UP", 0.3)
    w = Worker.__new__(Worker)  # only what _drain touches
    w.config = Config(stop_grace=0.0, timeout_grace=0.0)
    w.ctx = Context(w.config, None, None, frozenset(), "w")  # type: ignore[arg-type]
    w.pipeline = pipeline = NeverIdle()  # type: ignore[assignment]
    w.consumer = consumer = QuietConsumer()  # type: ignore[assignment]
    w._buffer = []
    result: list[bool] = []
    with caplog.at_level(logging.WARNING, "tomqueue.worker"):
        drainer = threading.Thread(target=lambda: result.append(w._drain()), daemon=True)
        drainer.start()
        drainer.join(10)
    assert result == [False], "_drain did not give up"
    assert pipeline.stopped and consumer.closed
    assert w.ctx.stopping.is_set()  # the grace applies however the loop ended
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert "stop_gave_up" in actions
    gave_up = next(r for r in caplog.records if getattr(r, "action", None) == "stop_gave_up")
    assert gave_up.levelno == logging.ERROR
    assert "1 job place(s) still busy" in gave_up.getMessage()


def test_pipeline_stop_waits_for_all_its_threads_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Abandoned job threads never end: stop() gives them one shared wait, not one each
    (four stuck threads cost 4 x STOP_JOIN before)."""
    monkeypatch.setattr(pipeline_module, "STOP_JOIN", 0.4)
    ctx = Context(Config(), None, None, frozenset(), "w")  # type: ignore[arg-type]
    pipeline = Pipeline(ctx, 1, lambda: None)
    pipeline.watchdog.start()
    release = threading.Event()
    for i in range(4):
        pipeline._spawn(lambda: park(release), f"tomqueue-job-stuck-{i}")
    try:
        started = time.monotonic()
        pipeline.stop()
        took = time.monotonic() - started
    finally:
        release.set()
    assert took < 1.2, f"stop() took {took:.2f} s with four stuck threads"
