"""Job payloads used by the test suite, in-process and by ``tomqueue worker --import
tests.jobs`` subprocesses (run with cwd = the repository root).

Every payload records what happened to it in a ledger file (see ``tests/ledger.py``), so
a test can count executions across threads and processes.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from tests import ledger
from tomqueue import handle_asynchronously


class Record:
    """Records one ``perform`` line: the basic exactly-once probe."""

    def __init__(self, path: str, marker: str) -> None:
        self.path = path
        self.marker = marker

    def perform(self) -> None:
        ledger.record(self.path, self.marker)


class Hooked:
    """Records every Delayed::Job hook in order; fails when ``fail`` is set."""

    def __init__(self, path: str, marker: str, fail: bool = False) -> None:
        self.path = path
        self.marker = marker
        self.fail = fail

    def _note(self, event: str) -> None:
        ledger.record(self.path, self.marker, event)

    def enqueue(self, job: Any) -> None:
        self._note("enqueue")

    def before(self, job: Any) -> None:
        self._note("before")

    def perform(self) -> None:
        self._note("perform")
        if self.fail:
            raise ValueError(f"hooked job {self.marker} failed on purpose")

    def success(self, job: Any) -> None:
        self._note("success")

    def error(self, job: Any, exc: BaseException) -> None:
        self._note("error")

    def after(self, job: Any) -> None:
        self._note("after")

    def failure(self, job: Any) -> None:
        self._note("failure")


class Boom:
    """Always raises. ``max_attempts`` / ``destroy_failed_jobs`` / ``retry_now`` tune it."""

    def __init__(
        self,
        path: str,
        marker: str,
        message: str = "boom",
        max_attempts: int | None = None,
        destroy_failed_jobs: bool | None = None,
        retry_now: bool = False,
    ) -> None:
        self.path = path
        self.marker = marker
        self.message = message
        if max_attempts is not None:
            self.max_attempts = max_attempts
        if destroy_failed_jobs is not None:
            self.destroy_failed_jobs = destroy_failed_jobs
        self.retry_now = retry_now

    def perform(self) -> None:
        ledger.record(self.path, self.marker)
        raise ValueError(f"{self.message} ({self.marker})")

    def reschedule_at(self, now: datetime, attempts: int) -> datetime | None:
        if self.retry_now:
            return now - timedelta(seconds=5)
        return None  # not a datetime: the default backoff applies

    def failure(self, job: Any) -> None:
        ledger.record(self.path, self.marker, "failure")


class Sleepy:
    """Sleeps ``seconds`` in small steps, recording ``start`` and (when done) ``perform``."""

    def __init__(self, path: str, marker: str, seconds: float) -> None:
        self.path = path
        self.marker = marker
        self.seconds = seconds

    def perform(self) -> None:
        ledger.record(self.path, self.marker, "start")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        ledger.record(self.path, self.marker)


class Slow:
    """Runs far past its ``max_run_time`` of 1 s unless interrupted."""

    max_run_time = 1

    def __init__(self, path: str, marker: str, seconds: float = 30.0) -> None:
        self.path = path
        self.marker = marker
        self.seconds = seconds

    def perform(self) -> None:
        ledger.record(self.path, self.marker, "start")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        ledger.record(self.path, self.marker)  # only when never interrupted


class Stubborn:
    """Ignores the timeout: catches every Exception in its loop and keeps going."""

    max_run_time = 1

    def __init__(self, path: str, marker: str, seconds: float = 6.0) -> None:
        self.path = path
        self.marker = marker
        self.seconds = seconds

    def perform(self) -> None:
        ledger.record(self.path, self.marker, "start")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            try:
                time.sleep(0.02)
            except Exception as exc:
                ledger.record(self.path, self.marker, f"ignored-{type(exc).__name__}")
        ledger.record(self.path, self.marker, "end")


class Blocked:
    """Blocks in one long C call: an interruption is raised only once the call returns."""

    def __init__(self, path: str, marker: str, seconds: float = 60.0) -> None:
        self.path = path
        self.marker = marker
        self.seconds = seconds

    def perform(self) -> None:
        ledger.record(self.path, self.marker, "start")
        time.sleep(self.seconds)
        ledger.record(self.path, self.marker, "end")


class Mailer:
    """A payload that names its own Delayed::Job queue."""

    queue_name = "mail"

    def __init__(self, path: str, marker: str) -> None:
        self.path = path
        self.marker = marker

    def perform(self) -> None:
        ledger.record(self.path, self.marker)


class Urgent:
    """A payload that carries its own priority attribute."""

    def __init__(self, path: str, marker: str, priority: int) -> None:
        self.path = path
        self.marker = marker
        self.priority = priority

    def perform(self) -> None:
        ledger.record(self.path, self.marker)


class Account:
    """Target of ``tomqueue.delay(account).deposit(...)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def deposit(self, path: str, marker: str, amount: int = 0) -> None:
        ledger.record(path, f"{marker}:{self.name}:{amount}")

    @handle_asynchronously
    def withdraw(self, path: str, marker: str, amount: int = 0) -> None:
        ledger.record(path, f"{marker}:{self.name}:-{amount}")


def add_to_ledger(path: str, marker: str, suffix: str = "") -> None:
    """Target of ``tomqueue.delay(add_to_ledger)(...)``."""
    ledger.record(path, marker + suffix)


@handle_asynchronously
def async_record(path: str, marker: str) -> None:
    ledger.record(path, marker)


@handle_asynchronously(priority=-5, queue="mail")
def async_record_urgent(path: str, marker: str) -> None:
    ledger.record(path, marker)


class Echo:
    """Carries an arbitrary value through the handler and checks it arrives unchanged."""

    def __init__(self, path: str, marker: str, value: Any) -> None:
        self.path = path
        self.marker = marker
        self.value = value
        self.expected = _fingerprint(value)

    def perform(self) -> None:
        same = _fingerprint(self.value) == self.expected
        ledger.record(self.path, f"{self.marker}-{'ok' if same else 'mismatch'}")


def _fingerprint(value: Any) -> str:
    import hashlib

    text = f"{type(value).__name__}:{value!r}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Spawner:
    """Enqueues ``children`` Record jobs from inside ``perform`` (jobs that enqueue jobs)."""

    def __init__(self, path: str, marker: str, children: int) -> None:
        self.path, self.marker, self.children = path, marker, children

    def perform(self) -> None:
        import tomqueue

        ledger.record(self.path, self.marker)
        for i in range(self.children):
            tomqueue.enqueue(Record(self.path, f"{self.marker}.{i}"))
