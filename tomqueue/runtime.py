"""Process-wide settings the long-running command-line processes (worker, deferred
manager) make for themselves once they have started; the library leaves them alone, but
for one pause (``collector_paused``, below).

- The garbage collector: what exists after start-up (modules, classes, SQLAlchemy's,
  pika's and the job modules' objects, ~70,000 of them) lives as long as the process,
  so it leaves the collector's generations (``gc.freeze``), and a young-generation
  collection runs every ``GC_YOUNG_THRESHOLD`` allocations instead of CPython's 700. In a
  busy worker the collector took ~8 % of the CPU (255 ms over a 20,000-job drain, most of
  it three full collections walking every module object); 7 ms after this. Objects that
  refer to each other are still collected, only less often.
- ``enqueue_many`` pauses the collector while it builds and writes a batch. A batch's
  objects (a request, a ``Job`` with its ORM state and a notification per payload) live
  until the batch is done, so young-generation collections keep promoting them, and every
  few batches that sets off a full collection, which walks every object of the process:
  ~90 ms of a 20,000-job run of 400-520 ms in a bare process (tests' harness, PostgreSQL),
  more in an application with more objects. Reference counting still frees what the batch
  drops; only objects that refer to each other wait for the collector's next run. An
  application that has disabled the collector keeps it disabled.
- The GIL switch interval stays CPython's 5 ms (a 1 ms one sent 128 job threads into a
  convoy: see bench/README.md).
- ``current_pid``: this process's id, read once and again in a forked child. The caches
  that must not cross a fork (engines, publishers) key on it, and ``os.getpid`` is a
  system call: three of them per ``enqueue``, ~1-4 µs each on our 2-core machines.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

GC_YOUNG_THRESHOLD = 10_000

_pid = os.getpid()


def current_pid() -> int:
    """``os.getpid()`` without the system call (kept current by ``os.register_at_fork``)."""
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def settle_gc() -> None:
    """Call once start-up (imports, configuration) is done. No full collection first: it
    takes ~50 ms here and finds no garbage after start-up."""
    gc.freeze()
    young, older, oldest = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, young), older, oldest)


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector paused for the block (left as it is when disabled
    already, e.g. by the application or by another thread's ``enqueue_many``)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
