"""Transports carry notifications from enqueue to workers.

- ``amqp``: RabbitMQ (the fast path): publisher confirms, mandatory, one exchange.
- ``polling``: no broker; workers poll the database (development mode and fallback).

Both offer the same two faces: a ``Publisher`` (thread-safe, waits for confirms: used by
the sweeper, by ``enqueue`` with ``sync_publish`` and by the polling worker) and a
``Consumer`` (owned by a worker's main thread). ``enqueue`` on a broker hands its
notifications to ``background.BackgroundPublisher`` instead and returns;
``flush_publishers`` waits for their confirms.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tomqueue.config import LEVELS, Config
from tomqueue.runtime import current_pid
from tomqueue.transport.base import Consumer, Delivery, Publisher

if TYPE_CHECKING:
    from tomqueue.transport.background import BackgroundPublisher

__all__ = [
    "Consumer",
    "Delivery",
    "Publisher",
    "close_publishers",
    "flush_publishers",
    "get_background_publisher",
    "get_publisher",
    "make_consumer",
]

_publishers: dict[tuple[int, str | None, str], Publisher] = {}
_lock = threading.Lock()


def get_publisher(config: Config) -> Publisher:
    """The process-wide publisher for this config (fork-safe: one per pid)."""
    key = (current_pid(), config.amqp_url, config.prefix)
    with _lock:
        publisher = _publishers.get(key)
        if publisher is None:
            if config.uses_broker:
                from tomqueue.transport.amqp import AmqpPublisher

                publisher = AmqpPublisher(config)
            else:
                from tomqueue.transport.polling import NullPublisher

                publisher = NullPublisher()
            _publishers[key] = publisher
        return publisher


def get_background_publisher(config: Config) -> BackgroundPublisher:
    """This process's background publisher for ``enqueue`` (see ``background``)."""
    from tomqueue.transport.background import get_background_publisher as get

    return get(config)


def flush_publishers(timeout: float | None = None) -> bool:
    """Wait until every notification this process handed to a background publisher so far
    is confirmed or given up; True if all were confirmed within ``timeout``."""
    background = sys.modules.get("tomqueue.transport.background")
    return background is None or background.flush_background(timeout)


def close_publishers(timeout: float = 5.0) -> None:
    """Close this process's publishers; background ones are flushed for up to
    ``timeout`` seconds first (what is left is logged as not confirmed)."""
    background = sys.modules.get("tomqueue.transport.background")
    if background is not None:
        background.close_background(timeout)
    with _lock:
        for publisher in _publishers.values():
            publisher.close()
        _publishers.clear()


def levels_in_range(config: Config, low: int | None, high: int | None) -> tuple[str, ...]:
    """The levels a worker limited to priorities [low, high] consumes: every level some
    mapped priority in the range goes to, and ``normal`` (where unmapped ones go) unless
    every integer in the range is mapped elsewhere."""

    def inside(p: int) -> bool:
        return (low is None or p >= low) and (high is None or p <= high)

    found = {level for p, level in config.priority_map.items() if inside(p)}
    bounded = low is not None and high is not None and high - low < 10_000
    unmapped = not bounded or any(
        p not in config.priority_map for p in range(low or 0, (high or 0) + 1)
    )
    if unmapped:
        found.add("normal")
    return tuple(level for level in LEVELS if level in found)


def make_consumer(
    config: Config,
    queues: Sequence[str | None],
    priority_range: tuple[int | None, int | None],
    threads: int = 1,
) -> Consumer:
    if config.uses_broker:
        from tomqueue.transport.amqp_consumer import AmqpConsumer

        return AmqpConsumer(
            config, queues, levels_in_range(config, *priority_range), prefetch=threads
        )
    from tomqueue.transport.polling import PollingConsumer

    return PollingConsumer(config, queues, priority_range)
