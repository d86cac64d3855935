"""The wire format: decode() turns any body into a Notification or a MessageError."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tomqueue import MessageError
from tomqueue.message import CONTENT_TYPE, MAX_BODY_BYTES, Notification, decode

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456)


def test_encode_matches_the_contract() -> None:
    note = Notification(42, 7, WHEN, priority=-1, queue="mail", kind="tests.jobs:Record")
    assert json.loads(note.encode()) == {
        "delayed_job_id": 42,
        "delayed_job_digest": "7",
        "run_at": "2024-05-06T07:08:09.123456+00:00",
    }
    assert CONTENT_TYPE == "application/json"
    headers = note.headers("high")
    assert headers == {
        "job_id": 42,
        "job_class": "tests.jobs:Record",
        "priority": -1,
        "priority_level": "high",
        "queue": "mail",
    }


@pytest.mark.parametrize(
    "note",
    [
        Notification(42, 7, WHEN),
        Notification(1, 0, datetime(2024, 5, 6)),  # whole second: microseconds still written
        Notification(2**62, 2**40, datetime(9999, 12, 31, 23, 59, 59, 999999), trace="x"),
    ],
)
def test_encode_is_compact_json_in_a_fixed_key_order(note: Notification) -> None:
    """The hand-written body is byte for byte what ``json.dumps`` would write."""
    expected = {
        "delayed_job_id": note.job_id,
        "delayed_job_digest": str(note.version),
        "run_at": note.run_at.isoformat(timespec="microseconds") + "+00:00",
    }
    assert note.encode() == json.dumps(expected, separators=(",", ":")).encode()
    assert decode(note.encode()).job_id == note.job_id


def test_each_body_carries_its_own_run_at_when_times_alternate() -> None:
    """The last ``run_at`` written out is remembered (a batch shares one): a different
    time, one a microsecond apart or the same moment with an offset, is written anew."""
    times = [WHEN, WHEN.replace(microsecond=123457), WHEN, datetime(2024, 5, 6), WHEN]
    for when in times:
        expected = when.isoformat(timespec="microseconds") + "+00:00"
        assert json.loads(Notification(1, 1, when).encode())["run_at"] == expected
    aware = WHEN.replace(tzinfo=UTC)
    assert Notification(1, 1, WHEN).encode() == Notification(1, 1, aware).encode()
    assert json.loads(Notification(1, 1, WHEN).encode())["run_at"].endswith("+00:00")


def test_round_trip_with_headers() -> None:
    note = Notification(42, 7, WHEN, priority=-1, queue="mail", kind="tests.jobs:Record")
    assert decode(note.encode(), note.headers("high")) == note


def test_default_queue_header_decodes_to_none() -> None:
    note = Notification(1, 1, WHEN)
    assert decode(note.encode(), note.headers("normal")).queue is None


def test_offset_run_at_is_converted_to_naive_utc() -> None:
    body = (
        b'{"delayed_job_id": 1, "delayed_job_digest": "3", "run_at": "2024-05-06T09:08:09+02:00"}'
    )
    note = decode(body)
    assert note.run_at == datetime(2024, 5, 6, 7, 8, 9) and note.run_at.tzinfo is None
    assert note.version == 3


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"string"', "not a JSON object"),
        (b'{"delayed_job_digest": "1", "run_at": "2024-01-01T00:00:00"}', "delayed_job_id"),
        (
            b'{"delayed_job_id": 0, "delayed_job_digest": "1", "run_at": "2024-01-01T00:00:00"}',
            "positive integer",
        ),
        (
            b'{"delayed_job_id": -5, "delayed_job_digest": "1", "run_at": "2024-01-01T00:00:00"}',
            "positive integer",
        ),
        (
            b'{"delayed_job_id": true, "delayed_job_digest": "1", "run_at": "2024-01-01T00:00:00"}',
            "positive integer",
        ),
        (
            b'{"delayed_job_id": "7", "delayed_job_digest": "1", "run_at": "2024-01-01T00:00:00"}',
            "positive integer",
        ),
        (b'{"delayed_job_id": 7, "run_at": "2024-01-01T00:00:00"}', "delayed_job_digest"),
        (
            b'{"delayed_job_id": 7, "delayed_job_digest": "abc", "run_at": "2024-01-01T00:00:00"}',
            "version number",
        ),
        (b'{"delayed_job_id": 7, "delayed_job_digest": "1"}', "run_at"),
        (b'{"delayed_job_id": 7, "delayed_job_digest": "1", "run_at": "tomorrow"}', "ISO-8601"),
        (b'{"delayed_job_id": 7, "delayed_job_digest": "1", "run_at": 17}', "ISO-8601"),
        (b"{" + b" " * MAX_BODY_BYTES + b"}", "exceeds"),
    ],
)
def test_malformed_bodies_raise_message_error(body: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode(body)


def test_hostile_headers_are_ignored_not_trusted() -> None:
    note = Notification(5, 1, WHEN)
    decoded = decode(note.encode(), {"priority": "urgent", "queue": None, "job_class": 12})
    assert decoded.priority == 0 and decoded.queue is None and decoded.kind == "12"


def test_deeply_nested_body_raises_message_error() -> None:
    with pytest.raises(MessageError):
        decode(b"[" * 3000)


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_traceparent_travels_in_the_headers() -> None:
    note = Notification(7, 3, datetime(2030, 1, 1), trace=TRACEPARENT)
    headers = note.headers("normal")
    assert headers["traceparent"] == TRACEPARENT
    assert decode(note.encode(), headers).trace == TRACEPARENT
    assert "traceparent" not in Notification(7, 3, datetime(2030, 1, 1)).headers("normal")


@pytest.mark.parametrize("bad", ["", "garbage", TRACEPARENT.upper(), 42, b"\xff", None])
def test_a_malformed_traceparent_is_ignored(bad: object) -> None:
    note = Notification(7, 3, datetime(2030, 1, 1))
    headers = {**note.headers("normal"), "traceparent": bad}
    assert decode(note.encode(), headers).trace == ""
