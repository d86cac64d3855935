"""Layer 2 — pop/ack: decode the delivery, and acknowledge it once the outcome is safe.

The ack comes after the outcome is recorded and its follow-up notifications are confirmed
(a retry's new notification is published *before* the old delivery is acked). A job that
runs longer than ``delivery_hold_limit`` has its delivery acked early, while it still runs:
RabbitMQ closes channels whose deliveries stay unacked past ``consumer_timeout``, and by
then the database row (locked, fenced) is what keeps the job safe, not the delivery.
"""

from __future__ import annotations

import logging
import time

from tomqueue import metrics
from tomqueue.errors import MessageError
from tomqueue.message import decode
from tomqueue.worker.work import Next, Work

log = logging.getLogger("tomqueue.worker")


def layer(work: Work, call_next: Next) -> None:
    consumer, delivery = work.ctx.consumer, work.delivery
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
        consumer.ack(delivery)
        return
    work.on_long_run = lambda: consumer.ack(delivery)
    work.hold_deadline = delivery.received_at + work.ctx.config.delivery_hold_limit
    call_next(work)
    consumer.publish(work.follow_ups)
    consumer.ack(delivery)
    if time.monotonic() > work.hold_deadline:
        log.debug("job %s held its delivery past the hold limit", work.note.job_id)
