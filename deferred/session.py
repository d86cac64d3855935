"""One broker connection of the deferred manager and its three channels.

- ``consumer``: consumes ``<prefix>.work.deferred`` with ``prefetch_count=0`` (unlimited)
  and holds the deliveries unacked. Classic queues only: a quorum queue caps an unlimited
  prefetch at 2,000 unacked messages per consumer, and the protocol caps an explicit
  prefetch at 65,535, so neither could hold a large backlog of future jobs.
- ``publisher``: confirm mode with many publishes in flight (``PipelinedPublisher``).
- ``declarer``: declarations (``ConfirmedChannel``). A failed declaration closes its
  channel, so it lives apart from the channels holding deliveries and confirms.

Everything is declared idempotently when the session opens: the work exchange, and the
deferred exchange and queue (``declare_deferred`` turns "exists with another type" into a
``ConfigError``). Queue sets of named Delayed::Job queues are declared when the first job
naming them arrives (``Holding.prepare``), before it is due.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pika.adapters.blocking_connection import BlockingConnection
from pika.exceptions import AMQPError, ChannelClosedByBroker

from tomqueue.config import Config
from tomqueue.errors import ConfigError, EnqueueError
from tomqueue.topology import Topology
from tomqueue.transport.amqp import ConfirmedChannel, connect
from tomqueue.transport.pipelined import PipelinedPublisher

log = logging.getLogger("deferred")

OnMessage = Callable[[Any, Any, Any, bytes], None]
OnCancel = Callable[[Any], None]


class Session:
    def __init__(self, config: Config, on_message: OnMessage, on_cancel: OnCancel) -> None:
        self.config = config
        self.topology = Topology.of(config)
        self.connection: BlockingConnection = connect(config, "deferred")
        try:
            self.declarer = ConfirmedChannel(self.connection, config)
            self.publisher = PipelinedPublisher(self.connection, config.publish_timeout)
            self.consumer = self.connection.channel()
            self.consumer.basic_qos(prefetch_count=0)
            self.consumer.add_on_cancel_callback(on_cancel)
            self.consumer.basic_consume(self.topology.deferred_queue, on_message)
        except BaseException:
            self.close()
            raise

    def ensure_queue_set(self, queue: str | None) -> str | None:
        """Declare a queue set before publishing to it; the reason it cannot be, or None."""
        try:
            self.declarer.ensure_queue_set(queue)
            return None
        except (ConfigError, EnqueueError) as exc:
            reason = str(exc)
        except ChannelClosedByBroker as exc:
            reason = f"{exc.reply_code} {exc.reply_text}"
        if not self.declarer.channel.is_open:  # a failed declaration closed it
            self.declarer = ConfirmedChannel(self.connection, self.config)
        return reason

    def ack(self, tags: list[int]) -> None:
        """Through pika's asynchronous channel: ``BlockingChannel.basic_ack`` runs the I/O
        loop once per ack; these go out together on the loop's next pass (the manager's
        loop runs it after every turn)."""
        channel = self.consumer._impl
        for tag in tags:
            if tag:
                channel.basic_ack(tag)

    def broken(self) -> str | None:
        """Why the session can no longer be used, or None while it is healthy."""
        if not self.connection.is_open:
            return "the connection closed"
        for name, channel in (("consumer", self.consumer), ("publisher", self.publisher.channel)):
            if not channel.is_open:
                reason = getattr(channel, "_closing_reason", None)
                return f"the {name} channel closed: {reason or 'unknown reason'}"
        return None

    def close(self) -> None:
        """Close the connection: the broker requeues every delivery still unacked."""
        connection = getattr(self, "connection", None)
        if connection is not None and connection.is_open:
            with contextlib.suppress(AMQPError, OSError):
                connection.close()
