"""What a worker that is slow to stop waits for: once its pipeline has not drained
``MARGIN`` seconds past ``stop_grace`` (the watchdog has released every job still running
by then), one WARNING (``action=slow_stop``) with the pipeline's counts and where each of
the process's threads is — identical stacks (idle job threads) once, with their count.
``GIVE_UP`` seconds past ``stop_grace + timeout_grace`` (a job thread or a database call
that never returns) the worker stops waiting and exits with one ERROR
(``action=stop_gave_up``), before a supervisor's ``stopwaitsecs`` (60 s in our examples,
against a 30 s grace) kills it without a word.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback

log = logging.getLogger("tomqueue.worker")

MARGIN = 5.0  # seconds past stop_grace before the report
GIVE_UP = 15.0  # seconds past stop_grace + timeout_grace before the worker exits anyway


def thread_stacks() -> str:
    """Every other thread's stack, identical ones grouped, most threads first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    groups: dict[str, list[str]] = {}
    for ident, frame in sys._current_frames().items():
        if ident != me:
            stack = "".join(traceback.format_stack(frame))
            groups.setdefault(stack, []).append(names.get(ident, str(ident)))
    parts = []
    for stack, threads in sorted(groups.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(sorted(threads)[:5]) + (", ..." if len(threads) > 5 else "")
        parts.append(f"--- {len(threads)} thread(s): {shown}\n{stack}")
    return "\n".join(parts)


def report(seconds: float, busy: int, unrecorded: int) -> None:
    log.warning(
        "still stopping after %.0f s: %d job place(s) busy, %d outcome(s) not yet recorded; "
        "where the threads are:\n%s",
        seconds,
        busy,
        unrecorded,
        thread_stacks(),
        extra={"action": "slow_stop"},
    )


def give_up(seconds: float, busy: int, unrecorded: int) -> None:
    log.error(
        "gave up waiting after %.0f s: %d job place(s) still busy, %d outcome(s) not yet "
        "recorded; exiting anyway. Jobs this worker still holds run again once its lease "
        "expires",
        seconds,
        busy,
        unrecorded,
        extra={"action": "stop_gave_up"},
    )
