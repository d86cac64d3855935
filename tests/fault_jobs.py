"""Jobs and the run ledger of the fault-injection suite (``tests/e2e/test_faults.py``) and of
the soak (``bench/soak.py``).

Worker subprocesses load these jobs with ``--import tests.fault_jobs`` (cwd = the repository
root). Every run of a job appends one line per event to a ledger file opened with
``O_APPEND`` (one short ``write`` is atomic on a local file system, so any number of worker
processes and threads share one ledger)::

    start <marker> <run id> <pid> <unix time> <attempts> <crashes> <job id>
    end   <marker> <run id> <pid> <unix time> <status>

``status`` is ``ok``, ``abort`` (``os.abort()`` follows) or the name of the exception that
ended the run (``WorkerStopping`` for a worker that stopped it). A run killed with its
process has no ``end`` line: the test that killed the process knows when it was dead and
passes that as the run's latest possible end (``deaths``). All times come from
``time.time()`` of processes on one host.

``check()`` answers every question of a fault scenario: which jobs never ran, which ran more
often than expected, which runs of one job overlapped in time, which never ended.

``python -m tests.fault_jobs enqueue LEDGER MARKER [COUNT] [SECONDS]`` enqueues ``COUNT``
ledger jobs from a fresh process configured by ``TOMQUEUE_*`` (used with failpoints that
must act in the enqueuing process) and prints ``committed <id> ...`` for the rows it wrote.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import ledger


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class LedgerJob:
    """Records its start and end; sleeps ``seconds`` (in small steps) in between."""

    def __init__(self, path: str, marker: str, seconds: float = 0.0) -> None:
        self.path = path
        self.marker = marker
        self.seconds = seconds

    def before(self, job: Any) -> None:
        self._row = (int(job.attempts or 0), int(job.crashes or 0), int(job.id or 0))

    def perform(self) -> None:
        run = uuid.uuid4().hex[:12]
        attempts, crashes, job_id = getattr(self, "_row", (-1, -1, 0))
        pid = os.getpid()
        _append(
            self.path,
            f"start {self.marker} {run} {pid} {time.time():.6f} {attempts} {crashes} {job_id}\n",
        )
        status = "ok"
        try:
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline:
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
            self.finish(run)
        except BaseException as exc:  # WorkerStopping, JobTimeout, ...: recorded, re-raised
            status = type(exc).__name__
            raise
        finally:
            _append(self.path, f"end {self.marker} {run} {pid} {time.time():.6f} {status}\n")

    def finish(self, run: str) -> None:
        """The last thing ``perform`` does before its ``end`` line (subclasses)."""


class BlockingJob(LedgerJob):
    """Sleeps in one blocking call (like a job waiting on a socket or in C code): an
    asynchronous exception raised in its thread is seen only when the call returns."""

    def perform(self) -> None:
        run = uuid.uuid4().hex[:12]
        attempts, crashes, job_id = getattr(self, "_row", (-1, -1, 0))
        pid = os.getpid()
        _append(
            self.path,
            f"start {self.marker} {run} {pid} {time.time():.6f} {attempts} {crashes} {job_id}\n",
        )
        status = "ok"
        try:
            time.sleep(self.seconds)
        except BaseException as exc:
            status = type(exc).__name__
            raise
        finally:
            _append(self.path, f"end {self.marker} {run} {pid} {time.time():.6f} {status}\n")


class AbortJob(LedgerJob):
    """Records its start, then its end with status ``abort``, then calls ``os.abort()``:
    the worker process dies by SIGABRT while holding the job's lock."""

    def perform(self) -> None:
        run = uuid.uuid4().hex[:12]
        attempts, crashes, job_id = getattr(self, "_row", (-1, -1, 0))
        pid = os.getpid()
        _append(
            self.path,
            f"start {self.marker} {run} {pid} {time.time():.6f} {attempts} {crashes} {job_id}\n",
        )
        _append(self.path, f"end {self.marker} {run} {pid} {time.time():.6f} abort\n")
        os.abort()


# --- reading the ledger ----------------------------------------------------------------------


@dataclass
class Run:
    marker: str
    run: str
    pid: int
    start: float
    attempts: int
    crashes: int
    job_id: int
    end: float | None = None
    status: str | None = None  # None: no end line (the process died)

    def latest_end(self, deaths: Mapping[int, float]) -> float:
        """When the run had certainly stopped: its end line, else its process's death."""
        if self.end is not None:
            return self.end
        return deaths.get(self.pid, math.inf)


def runs(path: str | Path) -> list[Run]:
    """Every run in the ledger, in start order."""
    by_id: dict[str, Run] = {}
    for line in ledger.complete_lines(path):
        parts = line.split(" ")
        if parts[0] == "start":
            _, marker, run, pid, when, attempts, crashes, job_id = parts
            by_id[run] = Run(
                marker, run, int(pid), float(when), int(attempts), int(crashes), int(job_id)
            )
        elif parts[0] == "end":
            _, _marker, run, _pid, when, status = parts
            by_id[run].end = float(when)
            by_id[run].status = status
    return sorted(by_id.values(), key=lambda r: r.start)


def runs_of(path: str | Path, marker: str) -> list[Run]:
    return [r for r in runs(path) if r.marker == marker]


def started(path: str | Path) -> set[str]:
    return {r.marker for r in runs(path)}


def completed(path: str | Path) -> set[str]:
    """Markers with a run that ended ``ok``."""
    return {r.marker for r in runs(path) if r.status == "ok"}


@dataclass
class Report:
    """What a ledger says about a set of expected jobs."""

    expected: int
    runs: list[Run] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # never completed
    duplicated: dict[str, int] = field(default_factory=dict)  # completed more than once
    unexpected_runs: dict[str, int] = field(default_factory=dict)  # ran another count
    overlapping: list[tuple[Run, Run]] = field(default_factory=list)
    unfinished: list[Run] = field(default_factory=list)  # no end, no known death
    strangers: list[str] = field(default_factory=list)  # markers nobody expected

    @property
    def done(self) -> int:
        return self.expected - len(self.lost)

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} job(s) never completed: {self.lost[:10]}")
        if self.duplicated:
            out.append(f"completed more than once: {dict(list(self.duplicated.items())[:10])}")
        if self.unexpected_runs:
            out.append(
                f"ran another number of times than expected: "
                f"{dict(list(self.unexpected_runs.items())[:10])}"
            )
        if self.overlapping:
            out.append(
                "overlapping runs of one job: "
                + "; ".join(
                    f"{a.marker}: pid {a.pid} [{a.start:.3f}, {a.end}] and "
                    f"pid {b.pid} started {b.start:.3f}"
                    for a, b in self.overlapping[:5]
                )
            )
        if self.unfinished:
            out.append(
                f"runs that never ended (process not known dead): "
                f"{[(r.marker, r.pid) for r in self.unfinished[:10]]}"
            )
        if self.strangers:
            out.append(f"unexpected markers: {self.strangers[:10]}")
        return out

    def assert_ok(self) -> None:
        problems = self.problems()
        assert not problems, "ledger check failed:\n  " + "\n  ".join(problems)


def check(
    path: str | Path,
    expected: Iterable[str],
    runs_expected: Mapping[str, int] | None = None,
    deaths: Mapping[int, float] | None = None,
    exactly_once: bool = True,
) -> Report:
    """Check the ledger.

    ``expected``: markers that must each complete (end ``ok``) exactly once; with
    ``exactly_once`` they must also have been *started* only once (else: at least once, any
    extra runs interrupted or killed). ``runs_expected``: ``{marker: runs}`` for jobs that
    must be started exactly that many times, however the runs ended (crashing jobs).
    ``deaths``: ``{pid: unix time}`` of processes the test killed, the latest end of their
    unfinished runs. Overlap: a run of a job that starts before an earlier run of the same
    job had certainly stopped. Every run of every marker is checked for overlap."""
    deaths = deaths or {}
    runs_expected = dict(runs_expected or {})
    markers = list(expected)
    all_runs = runs(path)
    report = Report(expected=len(markers) + len(runs_expected), runs=all_runs)
    grouped: dict[str, list[Run]] = defaultdict(list)
    for run in all_runs:
        grouped[run.marker].append(run)
    report.strangers = sorted(set(grouped) - set(markers) - set(runs_expected))
    for marker in markers:
        mine = grouped.get(marker, [])
        ok = sum(1 for r in mine if r.status == "ok")
        if ok == 0:
            report.lost.append(marker)
        elif ok > 1:
            report.duplicated[marker] = ok
        if exactly_once and len(mine) > 1:
            report.unexpected_runs[marker] = len(mine)
    for marker, count in runs_expected.items():
        if len(grouped.get(marker, [])) != count:
            report.unexpected_runs[marker] = len(grouped.get(marker, []))
    for mine in grouped.values():
        for i, run in enumerate(mine):
            if run.end is None and run.pid not in deaths:
                report.unfinished.append(run)
            for later in mine[i + 1 :]:
                if later.start < run.latest_end(deaths):
                    report.overlapping.append((run, later))
    return report


# --- a process that enqueues -------------------------------------------------------------------


def _enqueue_main(argv: list[str]) -> int:
    from tests.fault_jobs import LedgerJob as Job  # its kind must not be __main__:...
    from tomqueue import enqueue
    from tomqueue.config import Config

    ledger, marker = argv[0], argv[1]
    count = int(argv[2]) if len(argv) > 2 else 1
    seconds = float(argv[3]) if len(argv) > 3 else 0.0
    config = Config.from_env()
    for i in range(count):
        job_marker = marker if count == 1 else f"{marker}{i}"
        try:
            job = enqueue(Job(ledger, job_marker, seconds), config=config)
            print(f"committed {job.id} {job_marker}", flush=True)
        except Exception as exc:  # e.g. a failpoint raising after the commit
            print(f"enqueue of {job_marker} raised {type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "enqueue":
        sys.exit(_enqueue_main(sys.argv[2:]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
