"""A notification's publish frames, written out by ``frames``, are byte for byte what pika
marshals for ``basic_publish(exchange, key, body, properties(note, level), mandatory=True)``."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import pytest
from pika import frame, spec

from tomqueue.message import Notification
from tomqueue.transport.amqp import properties
from tomqueue.transport.frames import publish_frames

RUN_AT = datetime(2026, 12, 7, 3, 4, 5, 678901)

NOTES = [
    Notification(job_id=1, version=1, run_at=RUN_AT),
    Notification(job_id=2**31 - 1, version=7, run_at=RUN_AT, priority=-5, queue="mail"),
    Notification(job_id=2**31, version=2**40, run_at=RUN_AT, priority=2**31, kind="Big"),
    Notification(job_id=2**62, version=3, run_at=RUN_AT, priority=-(2**31) - 1, queue="q-1_x"),
    Notification(
        job_id=42,
        version=2,
        run_at=RUN_AT,
        priority=10,
        kind="Résumé::Mailer ✉" * 20,
        trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ),
]


def pika_frames(channel: int, exchange: str, key: str, note: Notification, level: str) -> bytes:
    body = note.encode()
    method = spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=True)
    return b"".join(
        (
            frame.Method(channel, method).marshal(),
            frame.Header(channel, len(body), properties(note, level)).marshal(),
            frame.Body(channel, body).marshal(),
        )
    )


@pytest.mark.parametrize("note", NOTES, ids=lambda n: str(n.job_id))
@pytest.mark.parametrize(
    ("channel", "exchange", "key", "level"),
    [
        (1, "tq.work", "default.normal", "normal"),
        (65535, "tq.deferred", "", "high"),
        (2, "", "q", ""),
    ],
)
def test_frames_are_pikas(
    note: Notification, channel: int, exchange: str, key: str, level: str
) -> None:
    body, frames = publish_frames(channel, exchange, key, note, level)
    assert body == note.encode()
    assert frames == pika_frames(channel, exchange, key, note, level)


def test_the_method_frame_is_kept_per_route() -> None:
    note = NOTES[0]
    _, first = publish_frames(1, "tq.work", "a", note, "normal")
    _, other_key = publish_frames(1, "tq.work", "b", note, "normal")
    _, again = publish_frames(1, "tq.work", "a", note, "normal")
    assert first == again
    assert first != other_key
    assert other_key == pika_frames(1, "tq.work", "b", note, "normal")


def test_kept_headers_serve_only_jobs_of_the_same_kind_priority_and_queue() -> None:
    """Only the job id's entry is written per notification; the rest of the table is kept
    per (kind, priority, level, queue). Interleaved jobs — ids on both sides of 32 bits,
    other kinds, priorities, levels, queues, a traceparent — each get pika's bytes."""
    base = Notification(job_id=5, version=1, run_at=RUN_AT, priority=3, queue="q", kind="A:B")
    variants = [
        base,
        replace(base, job_id=2**40),  # 64-bit id: another entry size, same kept rest
        replace(base, kind="A:C"),
        replace(base, priority=4),
        replace(base, queue=None),
        replace(base, trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        replace(base, job_id=6),
    ]
    for level in ("high", "low"):
        for note in variants + variants[::-1]:
            _, frames = publish_frames(1, "tq.work", "q.x", note, level)
            assert frames == pika_frames(1, "tq.work", "q.x", note, level), (note, level)
