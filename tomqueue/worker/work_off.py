"""Delayed::Job's ``work_off(num)``: run up to ``num`` due jobs in the calling thread,
straight from the database, through the same worker stack as ``tomqueue worker``."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Sequence

from tomqueue.config import Config, default_worker_name
from tomqueue.db import get_engine
from tomqueue.registry import Heartbeat
from tomqueue.worker.pipeline import Pipeline
from tomqueue.worker.work import Context


def application_modules() -> frozenset[str]:
    """Imported modules that belong to the application: not built in, not from the standard
    library, not from an installed package (site-packages)."""
    system = tuple(
        os.path.realpath(p) + os.sep
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(key))
    )
    found = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        ours = name.split(".")[0] in ("tomqueue", "deferred")
        if path and not ours and not os.path.realpath(path).startswith(system):
            found.add(name)
    return frozenset(found)


def work_off(
    num: int = 100, config: Config | None = None, imports: Sequence[str] | None = None
) -> tuple[int, int]:
    """Run up to ``num`` due jobs in this thread, straight from the database; return
    ``(successes, failures)`` like Delayed::Job's ``work_off``.

    Every queue is worked. ``imports`` names the modules whose job classes may be loaded
    (like ``--import``); without it, the application's own modules already imported (not
    the standard library's nor installed packages') may be."""
    from tomqueue.config import current
    from tomqueue.transport import get_publisher
    from tomqueue.transport.polling import PollingConsumer

    config = config or current()
    consumer = PollingConsumer(config, [], publisher=get_publisher(config))
    allowed = frozenset(imports) if imports is not None else application_modules()
    ctx = Context(config, get_engine(config), consumer, allowed, default_worker_name())
    registration = Heartbeat(config, ctx.engine, ctx.name, [])
    registration.register()  # so other workers see this process's locks as held
    pipeline = Pipeline(ctx, 1, wake_main=lambda: None)
    pipeline.start()
    try:
        for _ in range(num):
            found = consumer.fetch(1)
            if not found:
                break
            pipeline.submit(found)
            pipeline.wait_idle()
    finally:
        pipeline.stop()
        registration.stop()
    successes = ctx.counters.get("succeeded", 0)
    return successes, ctx.counters.get("retry", 0) + ctx.counters.get("failed", 0)
