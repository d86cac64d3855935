"""Transports carry notifications from enqueue to workers.

- ``amqp``: RabbitMQ (the fast path): publisher confirms, mandatory, one exchange.
- ``polling``: no broker; workers poll the database (development mode and fallback).

Both offer the same two faces: a ``Publisher`` (thread-safe, used by enqueue and by the
deferred manager) and a ``Consumer`` (owned by a worker's main thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from tomqueue.config import LEVELS, Config
from tomqueue.transport.base import Consumer, Delivery, Publisher

__all__ = [
    "Consumer",
    "Delivery",
    "Publisher",
    "close_publishers",
    "get_publisher",
    "make_consumer",
]

_publishers: dict[tuple[int, str | None, str], Publisher] = {}
_lock = threading.Lock()


def get_publisher(config: Config) -> Publisher:
    """The process-wide publisher for this config (fork-safe: one per pid)."""
    key = (os.getpid(), config.amqp_url, config.prefix)
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


def close_publishers() -> None:
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
