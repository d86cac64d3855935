"""Jobs for the deferred-manager tests, and the timing ledger they write.

Worker subprocesses load them with ``--import tests.deferred_jobs``. Each ``perform()``
appends one line to a ledger file opened with ``O_APPEND`` (a short write is atomic, so any
number of worker threads and processes can share one ledger)::

    <event> <key> <job id> <attempts> <unix time> <pid>

``event`` is ``start`` (first thing ``perform`` does) or ``resched`` (``reschedule_at``
chose the next run; the time is that next run). Times come from this host's clock, the same
clock the enqueueing test and the deferred manager use.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests import ledger


def record(path: str, event: str, key: str, job_id: int, attempts: int, when: float) -> None:
    line = f"{event} {key} {job_id} {attempts} {when:.6f} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def utc_timestamp(naive_utc: datetime) -> float:
    return naive_utc.replace(tzinfo=UTC).timestamp()


class Timed:
    """Records when it starts; fails its first ``fail_times`` attempts and then asks to be
    retried ``retry_in`` seconds later (``reschedule_at``)."""

    max_attempts = 5

    def __init__(self, ledger: str, key: str, fail_times: int = 0, retry_in: float = 2.0) -> None:
        self.ledger = ledger
        self.key = key
        self.fail_times = fail_times
        self.retry_in = retry_in

    def before(self, job: Any) -> None:
        self._job_id = int(job.id)
        self._attempts = int(job.attempts)

    def perform(self) -> None:
        now = time.time()
        job_id, attempts = getattr(self, "_job_id", 0), getattr(self, "_attempts", 0)
        record(self.ledger, "start", self.key, job_id, attempts, now)
        if attempts < self.fail_times:
            raise RuntimeError(f"{self.key}: failing attempt {attempts + 1} on purpose")

    def reschedule_at(self, now: datetime, attempts: int) -> datetime:
        when = now + timedelta(seconds=self.retry_in)
        job_id = getattr(self, "_job_id", 0)
        record(self.ledger, "resched", self.key, job_id, attempts, utc_timestamp(when))
        return when


@dataclass(frozen=True)
class Line:
    event: str
    key: str
    job_id: int
    attempts: int
    when: float
    pid: int


def read(path: str | Path) -> list[Line]:
    out = []
    for raw in ledger.complete_lines(path):
        event, key, job_id, attempts, when, pid = raw.split(" ")
        out.append(Line(event, key, int(job_id), int(attempts), float(when), int(pid)))
    return out


def starts(path: str | Path) -> list[Line]:
    return [line for line in read(path) if line.event == "start"]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]
