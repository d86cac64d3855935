"""Names of exchanges, queues and routing keys; the one place they are spelled.

- ``<prefix>.work``: topic exchange for due jobs. Routing key ``<queue>.<level>``.
- ``<prefix>.<queue>.<level>``: durable classic queue per Delayed::Job queue and level.
  The default Delayed::Job queue (``queue=None``) is called ``balance``:
  ``<prefix>.balance.high`` ... ``<prefix>.balance.bulk``.
- ``<prefix>.work.deferred``: fanout exchange and classic queue for future jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from tomqueue.config import LEVELS, QUEUE_NAME_RE, Config
from tomqueue.errors import EnqueueError


@dataclass(frozen=True)
class Topology:
    prefix: str
    default_queue: str

    @classmethod
    def of(cls, config: Config) -> Topology:
        return cls(config.prefix, config.default_queue)

    @cached_property
    def work_exchange(self) -> str:  # cached: the publisher compares it per notification
        return f"{self.prefix}.work"

    @cached_property
    def deferred_exchange(self) -> str:
        return f"{self.prefix}.work.deferred"

    @property
    def deferred_queue(self) -> str:
        return f"{self.prefix}.work.deferred"

    def queue_set(self, queue: str | None) -> str:
        """The name of a Delayed::Job queue's set on the broker (None → default)."""
        name = queue or self.default_queue
        if not QUEUE_NAME_RE.match(name):
            raise EnqueueError(f"queue name {name!r} must be 1-64 letters, digits, '_' or '-'")
        return name

    def routing_key(self, queue: str | None, level: str) -> str:
        return _routing_key(self, queue, level)

    def queue_name(self, queue: str | None, level: str) -> str:
        return f"{self.prefix}.{self.queue_set(queue)}.{level}"

    def queues_of(self, queue: str | None) -> list[tuple[str, str, str]]:
        """(level, queue name, routing key) for every level, most urgent first."""
        return [(lv, self.queue_name(queue, lv), self.routing_key(queue, lv)) for lv in LEVELS]


@lru_cache(maxsize=4096)
def _routing_key(topology: Topology, queue: str | None, level: str) -> str:
    """Computed once per queue and level: the publisher asks for every notification. A
    name that fails validation raises each time (exceptions are not cached)."""
    return f"{topology.queue_set(queue)}.{level}"
