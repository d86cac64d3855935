"""The two faces of a transport."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tomqueue.message import Notification


@dataclass(eq=False)
class Delivery:
    """One received notification (or raw body that may not parse)."""

    body: bytes
    level: str
    headers: dict[str, Any] = field(default_factory=dict)
    tag: Any = None
    received_at: float = 0.0
    generation: int = 0  # the channel generation the tag belongs to
    redelivered: bool = False
    source: str = ""  # the queue whose consumer pushed it ("": fetched with basic.get)
    _acked: bool = False
    _ack_lock: threading.Lock = field(default_factory=threading.Lock)

    def claim_ack(self) -> bool:
        """True exactly once: whoever gets True sends the ack."""
        with self._ack_lock:
            if self._acked:
                return False
            self._acked = True
            return True


class Publisher(Protocol):
    def publish(self, notes: Sequence[Notification]) -> None:
        """Publish and wait for confirms; raise PublishError if any is not confirmed."""

    def close(self) -> None: ...


class Consumer(Protocol):
    def start(self) -> None:
        """Connect and declare; called once from the worker's main thread."""

    def poll(self, timeout: float, capacity: int) -> list[Delivery]:
        """Do I/O for up to ``timeout`` seconds; return new deliveries (main thread only)."""

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge (idempotent, thread-safe)."""

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge several at once (idempotent, thread-safe)."""

    def requeue(self, delivery: Delivery) -> None:
        """Give an unstarted delivery back (thread-safe)."""

    def publish(self, notes: Sequence[Notification]) -> None:
        """Publish with confirms from any thread."""

    def take_above(self, level: str, limit: int) -> list[Delivery]:
        """Up to ``limit`` waiting deliveries more urgent than ``level`` that have not been
        delivered to us yet (main thread only)."""

    def is_drained(self) -> bool:
        """True when nothing is waiting for this consumer (for --exit-on-complete)."""

    def wake(self) -> None:
        """Interrupt a running ``poll`` (thread-safe)."""

    def close(self) -> None: ...
