"""One notification's ``basic.publish`` as the bytes that go on the wire.

pika marshals a publish through general machinery — a ``BasicProperties`` object, an AMQP
table encoder that handles every type, three frame objects — which costs the publisher
thread about 40 µs a notification on our 2-core machines: more than the rest of its work
per notification. A notification's publish always has the same shape, so it is written out
here: the method frame (``basic.publish``, mandatory) is marshaled by pika once per
channel, exchange and routing key and kept; the content header carries exactly
``properties()``'s four properties (content type, headers, persistent delivery mode,
message id); the body is one frame. The bytes are identical to pika's
(tests/unit/test_frames.py compares them) and are handed to the connection's output
buffer as one piece.

Sizes: a notification's body is under 200 bytes and its content header under 2 KiB
(``kind`` ≤ 255 characters, queue names ≤ 64, a traceparent 55), far below the smallest
frame size AMQP allows (4096), so neither is ever split.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

from pika import data, frame, spec

from tomqueue.message import CONTENT_TYPE, Notification

_FRAME_END = bytes([spec.FRAME_END])
_PROPERTY_FLAGS = (
    spec.BasicProperties.FLAG_CONTENT_TYPE
    | spec.BasicProperties.FLAG_HEADERS
    | spec.BasicProperties.FLAG_DELIVERY_MODE
    | spec.BasicProperties.FLAG_MESSAGE_ID
)
_CONTENT_TYPE = bytes([len(CONTENT_TYPE)]) + CONTENT_TYPE.encode()
_PERSISTENT = b"\x02"  # delivery_mode 2
_INT32 = range(-(2**31), 2**31)
_INT64 = struct.Struct(">q")
_FIRST_HEADER = "job_id"  # Notification.headers' first entry, the one that differs per job
_FIRST_ENTRY = bytes([len(_FIRST_HEADER)]) + _FIRST_HEADER.encode()
_TABLE_RESTS: dict[tuple[str, int, str, str | None], bytes] = {}
_TABLE_RESTS_KEPT = 4096


def publish_frames(
    channel: int, exchange: str, key: str, note: Notification, level: str
) -> tuple[bytes, bytes]:
    """(body, the publish's three frames marshaled back to back)."""
    body = note.encode()
    header = struct.pack(">HHQH", spec.BasicProperties.INDEX, 0, len(body), _PROPERTY_FLAGS)
    header += _properties(note, level)
    return body, b"".join(
        (
            _method_frame(channel, exchange, key),
            _frame(spec.FRAME_HEADER, channel, header),
            _frame(spec.FRAME_BODY, channel, body),
        )
    )


@lru_cache(maxsize=4096)
def _method_frame(channel: int, exchange: str, key: str) -> bytes:
    method = spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=True)
    marshaled: bytes = frame.Method(channel, method).marshal()
    return marshaled


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + _FRAME_END


def _properties(note: Notification, level: str) -> bytes:
    """Content type, headers, delivery mode and message id, in AMQP's property order."""
    message_id = f"{note.job_id}:{note.version}".encode()
    return b"".join(
        (
            _CONTENT_TYPE,
            _headers(note, level),
            _PERSISTENT,
            bytes([len(message_id)]),
            message_id,
        )
    )


def _headers(note: Notification, level: str) -> bytes:
    """The headers table. Only its first entry, the job id, differs between the jobs of a
    kind, priority and queue: the rest is encoded once and kept (without a traceparent,
    which differs per enqueue)."""
    key = (note.kind, note.priority, level, note.queue)
    rest = None if note.trace else _TABLE_RESTS.get(key)
    if rest is None:
        headers = note.headers(level)
        first = next(iter(headers))
        assert first == _FIRST_HEADER, f"the headers start with {first!r}"
        rest = b"".join(_entry(name, value) for name, value in list(headers.items())[1:])
        if not note.trace:
            if len(_TABLE_RESTS) >= _TABLE_RESTS_KEPT:
                _TABLE_RESTS.clear()
            _TABLE_RESTS[key] = rest
    first_entry = _FIRST_ENTRY + _value(note.job_id)
    return struct.pack(">I", len(first_entry) + len(rest)) + first_entry + rest


def _entry(name: str, value: Any) -> bytes:
    encoded_name = name.encode()
    return bytes([len(encoded_name)]) + encoded_name + _value(value)


def _value(value: Any) -> bytes:
    """A table value as pika encodes it: text as a long string, an integer as 32 bits when
    it fits and 64 otherwise; any other type through pika's own encoder."""
    if type(value) is str:
        encoded = value.encode()
        return b"S" + struct.pack(">I", len(encoded)) + encoded
    if type(value) is int:
        return b"I" + struct.pack(">i", value) if value in _INT32 else b"l" + _INT64.pack(value)
    pieces: list[bytes] = []
    data.encode_value(pieces, value)
    return b"".join(pieces)
