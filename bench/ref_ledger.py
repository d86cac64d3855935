"""How the reference runs (Celery, Dramatiq) count finished jobs: each no-op job appends one
fixed-size record, its ``time.time()``, to a ledger file opened once per process with
``O_APPEND`` (one short ``write`` is atomic, so threads and processes can share it).

The count is the file size divided by ``RECORD``; the last record is when the last job ran.
The broker cannot tell this on its own: ``queue.declare`` counts only *ready* messages, not
the ones a worker has prefetched and not acked yet (and Celery acks before it runs a task).

Kept free of heavy imports: the reference workers import it, and their start-up is timed.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

URL_ENV = "BENCH_REF_AMQP_URL"
QUEUE_ENV = "BENCH_REF_QUEUE"
LEDGER_ENV = "BENCH_REF_LEDGER"

RECORD = 18  # b"%17.6f\n": seconds since the epoch, microseconds, until the year 2286

_fds: dict[str, int] = {}
_lock = threading.Lock()


def append_time(path: str) -> None:
    """Record that a job ran now: one ``write`` on a descriptor held for the process."""
    fd = _fds.get(path)
    if fd is None:
        with _lock:
            fd = _fds.get(path)
            if fd is None:
                fd = _fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"%17.6f\n" % time.time())


def ledger_path() -> str:
    """The ledger of this worker (``BENCH_REF_LEDGER``)."""
    return os.environ[LEDGER_ENV]


def count(path: str | Path) -> int:
    """Jobs recorded so far (0 if none yet)."""
    try:
        return os.stat(path).st_size // RECORD
    except FileNotFoundError:
        return 0


def times(path: str | Path) -> list[float]:
    """Every recorded time, in file order."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [float(data[i : i + RECORD]) for i in range(0, len(data) - RECORD + 1, RECORD)]
