"""What a worker that is slow to stop waits for: once its pipeline has not drained
``MARGIN`` seconds past ``stop_grace`` (the watchdog has released every job still running
by then), one WARNING (``action=slow_stop``) with the pipeline's counts and where each of
the process's threads is — identical stacks (idle job threads) once, with their count.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback

log = logging.getLogger("tomqueue.worker")

MARGIN = 5.0  # seconds past stop_grace before the report


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
