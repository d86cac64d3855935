"""The wire format: a notification says "job <id>, version <digest>, is due at <run_at>"."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tomqueue.errors import MessageError

CONTENT_TYPE = "application/json"
MAX_BODY_BYTES = 4096
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@dataclass(frozen=True, slots=True)
class Notification:
    job_id: int
    version: int
    run_at: datetime  # naive UTC
    priority: int = 0
    queue: str | None = None
    kind: str = ""
    trace: str = ""  # the enqueuing span's W3C traceparent (tomqueue.tracing), if any

    def encode(self) -> bytes:
        """The JSON body, compact, keys in this order. Written out rather than built with
        ``json.dumps`` (a new encoder per call: a tenth of the publisher thread's time):
        every value is an integer or an ISO-8601 timestamp, nothing needs escaping."""
        return (
            f'{{"delayed_job_id":{self.job_id:d},"delayed_job_digest":"{self.version:d}",'
            f'"run_at":"{_iso(self.run_at)}"}}'
        ).encode()

    def headers(self, level: str) -> dict[str, Any]:
        """AMQP headers that make a message readable in the management UI. ``job_id``
        comes first; the others depend only on kind, priority, level, queue and trace
        (``transport.frames`` keeps them encoded per those)."""
        headers: dict[str, Any] = {
            "job_id": self.job_id,
            "job_class": self.kind[:255],
            "priority": self.priority,
            "priority_level": level,
            "queue": self.queue or "",
        }
        if self.trace:
            headers["traceparent"] = self.trace
        return headers


_last_iso: tuple[datetime, str] = (datetime.min, datetime.min.isoformat())


def _iso(run_at: datetime) -> str:
    """ISO-8601 UTC text of a naive UTC time. The last one is remembered: the jobs of an
    ``enqueue_many`` batch share one ``run_at`` (a third of ``encode``'s time otherwise)."""
    global _last_iso
    last = _last_iso  # one read: another thread may replace it meanwhile
    if last[0] == run_at and last[0].tzinfo is run_at.tzinfo:
        return last[1]
    text = run_at.replace(tzinfo=UTC).isoformat(timespec="microseconds")
    _last_iso = (run_at, text)
    return text


def decode(body: bytes, headers: dict[str, Any] | None = None) -> Notification:
    """Parse a message body; ``MessageError`` explains what is wrong with it."""
    if len(body) > MAX_BODY_BYTES:
        raise MessageError(f"message body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MessageError(f"message body is not JSON: {body[:80]!r}") from None
    if not isinstance(data, dict):
        raise MessageError(f"message body is not a JSON object: {body[:80]!r}")
    job_id = data.get("delayed_job_id")
    digest = data.get("delayed_job_digest")
    if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id <= 0:
        raise MessageError(f"delayed_job_id must be a positive integer, got {job_id!r}")
    try:
        version = int(digest)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MessageError(f"delayed_job_digest must be a version number, got {digest!r}") from None
    run_at = _parse_time(data.get("run_at"))
    headers = headers or {}
    priority = headers.get("priority", 0)
    return Notification(
        job_id=job_id,
        version=version,
        run_at=run_at,
        priority=priority if isinstance(priority, int) else 0,
        queue=headers.get("queue") or None,
        kind=str(headers.get("job_class", "")),
        trace=_traceparent(headers.get("traceparent")),
    )


def _traceparent(value: Any) -> str:
    """A well-formed W3C traceparent, or "" (a malformed one is ignored, not an error)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and _TRACEPARENT.fullmatch(value):
        return value
    return ""


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise MessageError(f"run_at must be an ISO-8601 string, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MessageError(f"run_at is not ISO-8601: {value!r}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed
