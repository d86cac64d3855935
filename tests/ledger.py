"""An append-only execution ledger shared by test processes.

Each job's ``perform()`` appends one line ``<event> <marker> <pid> <thread>`` to a file
opened with ``O_APPEND``: writes of one short line are atomic on a local file system, so
any number of threads and worker processes can record into the same ledger and the test
counts exactly how often each job ran, in which order and in which process.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    event: str
    marker: str
    pid: int
    thread: str


def record(path: str, marker: str, event: str = "perform") -> None:
    line = f"{event} {marker} {os.getpid()} {threading.current_thread().name}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def complete_lines(path: str | Path) -> list[str]:
    """The ledger's complete lines ([] if nothing was recorded yet). A line still being
    written by another process (no newline yet) is left for the next read."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


def read(path: str | Path) -> list[Entry]:
    out = []
    for line in complete_lines(path):
        event, marker, pid, thread = line.split(" ", 3)
        out.append(Entry(event, marker, int(pid), thread))
    return out


def markers(path: str | Path, event: str = "perform") -> list[str]:
    """Markers of ``event`` entries, in the order they were recorded."""
    return [e.marker for e in read(path) if e.event == event]


def counts(path: str | Path, event: str = "perform") -> Counter[str]:
    return Counter(markers(path, event))


def wait_for(
    condition: Callable[[], object], timeout: float, interval: float = 0.05, what: str = ""
) -> object:
    """Poll ``condition`` until it is truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition}")
        time.sleep(interval)
