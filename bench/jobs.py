"""Job payloads of the benchmark: loaded by ``tomqueue worker --import bench.jobs`` and by
the Delayed::Job-style baseline alike.

``Stamp`` appends ``<time.time()> <marker>`` to a file opened with ``O_APPEND`` (one short
write is atomic, so any number of threads and processes can share it): the benchmark reads
it back to measure when each job started.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Noop:
    """Does nothing: the cost measured is the queue's alone."""

    def perform(self) -> None:
        return None


class Stamp:
    """Records when ``perform`` started, under ``marker``."""

    def __init__(self, path: str, marker: str = "-") -> None:
        self.path = path
        self.marker = marker

    def perform(self) -> None:
        stamp(self.path, self.marker)


def stamp(path: str, marker: str) -> None:
    line = f"{time.time():.6f} {marker}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_stamps(path: str | Path) -> list[tuple[float, str]]:
    """``[(started, marker)]`` in file order ([] if nothing was recorded yet)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.split("\n")[:-1]:  # a line still being written is left for later
        when, _, marker = line.partition(" ")
        out.append((float(when), marker))
    return out


def count_stamps(path: str | Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0
