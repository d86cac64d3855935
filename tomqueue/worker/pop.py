"""Layer 2 — pop/ack: decode the deliveries, and acknowledge them once the outcome is safe.

On the way back up, acks come after the outcomes are recorded and their follow-up
notifications confirmed (a retry's new notification is published *before* the old delivery
is acked), one round of acks per batch. A job that runs longer than ``delivery_hold_limit``
has its delivery acked early by the watchdog, while it still runs: RabbitMQ closes channels
whose deliveries stay unacked past ``consumer_timeout``, and by then the database row
(locked, fenced, recovered by the sweeper if this worker dies) is what keeps the job safe,
not the delivery.
"""

from __future__ import annotations

import logging

from tomqueue import metrics
from tomqueue.errors import MessageError
from tomqueue.message import decode
from tomqueue.worker.work import Batch, BatchNext

log = logging.getLogger("tomqueue.worker")


def enter(batch: Batch, call_next: BatchNext) -> None:
    valid = []
    for work in batch:
        delivery = work.delivery
        try:
            work.note = decode(delivery.body, delivery.headers)
        except MessageError as exc:
            work.ctx.count("malformed")
            metrics.SKIPPED.labels("malformed").inc()
            log.warning(
                "dropping a malformed message from %s: %s",
                delivery.level,
                exc,
                extra={"action": "malformed_message"},
            )
            work.stop("malformed")
            continue
        valid.append(work)
    if valid:
        call_next(valid)


def leave(batch: Batch, call_next: BatchNext) -> None:
    call_next(batch)  # the outcomes are recorded below first
    consumer = batch[0].ctx.consumer
    consumer.publish([note for work in batch for note in work.follow_ups])
    consumer.ack_many([work.delivery for work in batch])
