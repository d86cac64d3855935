"""Must-show 4 (in-process part): bad input is acknowledged, logged and loses nothing.

- AMQP stacks: a stale-version message, a message for an unknown job id and a non-JSON body
  are each acked and logged, and the worker goes on to run the good jobs behind them.
- Every stack: a job whose handler names a module the worker was not told to load (or is
  malformed) ends with ``failed_at`` and a clear ``last_error``; the worker keeps working.
(The "hostile module is never imported" check runs a real worker process: tests/e2e.)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, update

import tomqueue
from tests import ledger
from tests.conftest import (
    AMQP_STACKS,
    Stack,
    all_queue_names,
    declare_topology,
    drain_queue,
    job_count,
    on_stacks,
    publish_raw,
    queue_depth,
    run_worker,
)
from tests.jobs import Boom, Echo, Record
from tomqueue.db import get_engine
from tomqueue.enqueue import notification
from tomqueue.errors import EnqueueError
from tomqueue.message import Notification
from tomqueue.schema import Job


def set_handler(config: tomqueue.Config, job_id: int, handler: str) -> None:
    with get_engine(config).begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(handler=handler))


def row(config: tomqueue.Config, job_id: int) -> Job | None:
    with get_engine(config).connect() as conn:
        found = conn.execute(select(Job.__table__).where(Job.id == job_id)).first()
    return None if found is None else Job(**found._asdict())


@on_stacks(*AMQP_STACKS)
def test_stale_unknown_and_non_json_messages_are_acked_and_logged(
    stack: Stack, ledger_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = stack.config
    declare_topology(config)
    caplog.set_level(logging.INFO, logger="tomqueue")
    first = tomqueue.enqueue(Record(ledger_path, "first"))
    normal = f"{config.prefix}.balance.normal"
    assert len(drain_queue(config, normal)) == 1  # its notification goes behind the bad ones
    stale = Notification(first.id, first.version + 5, first.run_at, 0, None, "tests.jobs:Record")
    publish_raw(config, stale.encode())
    older = Notification(first.id, first.version - 1, first.run_at)
    publish_raw(config, older.encode())
    unknown = Notification(987654321, 1, first.run_at)
    publish_raw(config, unknown.encode())
    publish_raw(config, b"this is not json \xff\xfe")
    publish_raw(config, b'{"delayed_job_id": "seven", "delayed_job_digest": "1"}')
    publish_raw(config, b"[1, 2, 3]")
    publish_raw(config, notification(first).encode())
    last = tomqueue.enqueue(Record(ledger_path, "last"))

    worker = run_worker(config, threads=1)

    assert ledger.markers(ledger_path) == ["first", "last"]
    assert job_count(config) == 0
    counters = worker.counters
    assert counters.get("skipped_stale") == 2
    assert counters.get("skipped_missing") == 1
    assert counters.get("malformed") == 3
    assert counters.get("succeeded") == 2
    assert not counters.get("internal_error")
    for name in all_queue_names(config):
        assert queue_depth(config, name)[0] == 0, f"{name} still holds messages"
    text = caplog.text
    assert "malformed message" in text and "not JSON" in text
    assert f"job {first.id} not taken: stale" in text
    assert "job 987654321 not taken: missing" in text
    assert last.id != first.id


@on_stacks(("mysql", "amqp"))  # the decoder does not depend on the database
def test_deeply_nested_json_body_is_dropped_as_malformed(stack: Stack, ledger_path: str) -> None:
    config = stack.config
    declare_topology(config)
    publish_raw(config, b"[" * 3000)
    tomqueue.enqueue(Record(ledger_path, "after"))

    worker = run_worker(config, threads=1, timeout=4)

    assert ledger.markers(ledger_path) == ["after"]
    assert worker.counters.get("malformed") == 1
    assert not worker.counters.get("internal_error")
    assert queue_depth(config, f"{config.prefix}.balance.normal")[0] == 0


UNLOADABLE = {
    "not-allowed": (
        '{"kind":"tests_hostile_module_xyz:Evil","attrs":{}}',
        ["HandlerError", "tests_hostile_module_xyz", "--import"],
    ),
    "not-json": ("this is {not json", ["HandlerError", "not valid JSON"]),
    "no-such-class": (
        '{"kind":"tests.jobs:NoSuchJob","attrs":{}}',
        ["HandlerError", "NoSuchJob"],
    ),
    "defined-elsewhere": (
        '{"kind":"tests.jobs:ledger","attrs":{}}',
        ["HandlerError", "tests.jobs:ledger"],
    ),
    "dunder-path": (
        '{"kind":"tests.jobs:Record.__init__.__globals__","attrs":{}}',
        ["HandlerError", "__init__"],
    ),
    "not-a-class": (
        '{"kind":"tests.jobs:add_to_ledger","attrs":{}}',
        ["HandlerError", "not a class"],
    ),
}


@pytest.mark.parametrize("case", list(UNLOADABLE))
def test_unloadable_handler_fails_the_job_and_the_worker_goes_on(
    stack: Stack, ledger_path: str, case: str
) -> None:
    config = stack.config
    handler, expected = UNLOADABLE[case]
    bad = tomqueue.enqueue(Record(ledger_path, "bad"), priority=-1)
    set_handler(config, bad.id, handler)
    good = tomqueue.enqueue(Record(ledger_path, "good"), priority=0)

    worker = run_worker(config, threads=1)

    failed = row(config, bad.id)
    assert failed is not None, "the job must be kept, failed (destroy_failed_jobs is off)"
    assert failed.failed_at is not None
    assert failed.locked_at is None and failed.locked_by is None
    assert failed.last_error is not None
    for text in expected:
        assert text in failed.last_error, (text, failed.last_error)
    assert row(config, good.id) is None
    assert ledger.markers(ledger_path) == ["good"]
    assert not worker.counters.get("internal_error")
    assert "tests_hostile_module_xyz" not in sys.modules


POISON_HANDLERS = {
    "missing-method": (
        '{"kind":"tests.jobs:Record","attrs":{"path":"/nonexistent","marker":"m",'
        '"x":{"__tq__":"method","self":{"__tq__":"object","kind":"tests.jobs:Record",'
        '"attrs":{}},"name":"no_such_method"}}}'
    ),
    "deep-nesting": '{"kind":"tests.jobs:Record","attrs":{"x":' + "[" * 5000 + "]" * 5000 + "}}",
}


@on_stacks(("sqlite", "polling"), ("postgresql", "amqp"))  # bounded cost while it fails
@pytest.mark.parametrize("case", list(POISON_HANDLERS))
def test_handler_that_breaks_the_decoder_fails_the_job(
    stack: Stack, ledger_path: str, case: str
) -> None:
    config = stack.config
    bad = tomqueue.enqueue(Record(ledger_path, "bad"), priority=-1)
    set_handler(config, bad.id, POISON_HANDLERS[case])
    tomqueue.enqueue(Record(ledger_path, "good"), priority=0)

    worker = run_worker(config, threads=1, timeout=4)

    failed = row(config, bad.id)
    assert failed is not None and failed.failed_at is not None
    assert failed.last_error and "HandlerError" in failed.last_error
    assert ledger.markers(ledger_path) == ["good"]
    assert not worker.counters.get("internal_error")


ODD_VALUES = {
    "bytes": b"\xff\x00\xfe\x80 not utf-8",
    "surrogate": "lone \udcff surrogate",
    "astral": "emoji 😀 and NUL-free ✓",
    "nul": "text with a NUL \x00 inside (PostgreSQL rejects raw NUL in text columns)",
    "large": "x" * 1_000_000,
    "nested": {"a": [1, (2, b"\x00")], "b": {"c": None}},
}


def test_non_utf8_and_large_arguments_arrive_unchanged(stack: Stack, ledger_path: str) -> None:
    for name, value in ODD_VALUES.items():
        tomqueue.enqueue(Echo(ledger_path, name, value))

    run_worker(stack.config, threads=1)

    assert sorted(ledger.markers(ledger_path)) == sorted(f"{n}-ok" for n in ODD_VALUES)
    assert job_count(stack.config) == 0


def test_work_off_does_not_run_handlers_naming_arbitrary_modules(
    sqlite_config: tomqueue.Config, ledger_path: str, tmp_path: Path
) -> None:
    import subprocess  # noqa: F401 - imported, as in most applications

    marker = tmp_path / "pwned"
    handler = json.dumps(
        {
            "kind": "tomqueue.delay:PerformableMethod",
            "attrs": {
                "target": {"__tq__": "ref", "kind": "subprocess:run"},
                "method": None,
                "args": [[sys.executable, "-c", f"open({str(marker)!r}, 'w')"]],
                "kwargs": {},
            },
        }
    )
    job = tomqueue.enqueue(Record(ledger_path, "x"))
    set_handler(sqlite_config, job.id, handler)

    tomqueue.work_off(5)

    assert not marker.exists(), "work_off ran a command named by a stored handler"
    failed = row(sqlite_config, job.id)
    assert failed is not None and failed.failed_at is not None


@on_stacks(("postgresql", "amqp"))  # the decoder does not depend on the database
def test_oversized_message_is_dropped_as_malformed(stack: Stack, ledger_path: str) -> None:
    from tomqueue.message import MAX_BODY_BYTES

    config = stack.config
    declare_topology(config)
    job = tomqueue.enqueue(Record(ledger_path, "after"))
    padded = notification(job).encode()[:-1] + b" " * MAX_BODY_BYTES + b"}"  # valid JSON
    publish_raw(config, padded)

    worker = run_worker(config, threads=1, timeout=10)

    assert ledger.markers(ledger_path) == ["after"]
    assert worker.counters.get("malformed") == 1
    assert not worker.counters.get("internal_error")
    assert queue_depth(config, f"{config.prefix}.balance.normal")[0] == 0


FOUR_BYTE = "failed on 💥 \U0001d11e \U0001f600"  # astral plane: 4 bytes each in UTF-8


@on_stacks(("mysql", "amqp"), ("postgresql", "amqp"), ("sqlite", "polling"))
def test_four_byte_utf8_in_an_error_is_stored_intact(stack: Stack, ledger_path: str) -> None:
    """Handlers are stored ASCII-escaped, so only ``last_error`` carries raw 4-byte UTF-8
    to the database: MariaDB needs utf8mb4 for it (utf8mb3 rejects it)."""
    config = stack.config
    job = tomqueue.enqueue(Boom(ledger_path, "astral", message=FOUR_BYTE, max_attempts=1))
    tomqueue.enqueue(Record(ledger_path, "next"))

    worker = run_worker(config, threads=1)

    failed = row(config, job.id)
    assert failed is not None and failed.failed_at is not None
    assert failed.last_error and f"ValueError: {FOUR_BYTE} (astral)" in failed.last_error
    assert sorted(ledger.markers(ledger_path)) == ["astral", "next"]
    assert not worker.counters.get("internal_error")


@on_stacks(("mysql", "polling"))
def test_a_handler_over_the_servers_packet_limit_is_refused_at_enqueue(
    stack: Stack, ledger_path: str
) -> None:
    """MariaDB refuses a statement over ``max_allowed_packet`` by dropping the connection
    ("server has gone away"): enqueue says so first, in words, and writes nothing."""
    from tomqueue.db import STATEMENT_MARGIN, statement_limit

    packet = statement_limit(stack.config)
    assert packet is not None
    too_big = Record(ledger_path, "x" * (packet - STATEMENT_MARGIN + 100))
    with pytest.raises(EnqueueError, match="max_allowed_packet"):
        tomqueue.enqueue(too_big)
    with pytest.raises(EnqueueError, match="max_allowed_packet"):
        tomqueue.enqueue_many([Record(ledger_path, "ok"), too_big])
    assert job_count(stack.config) == 0
    fits = tomqueue.enqueue(Record(ledger_path, "y" * 1_000_000))
    assert len(fits.handler) > 1_000_000 and job_count(stack.config) == 1


@on_stacks(("mysql", "polling"))
def test_enqueue_many_splits_its_statement_under_the_packet_limit(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty 30 kB handlers with a 300 kB packet limit: several statements, one transaction,
    every row stored and the ids in order."""
    from sqlalchemy import event

    from tomqueue import db

    monkeypatch.setitem(db._statement_limits, stack.config.database_url, 300_000)
    statements: list[str] = []
    engine = get_engine(stack.config)

    def count(_conn: object, _cursor: object, sql: str, *_args: object) -> None:
        if "JSON_TABLE" in sql:
            statements.append(sql)

    event.listen(engine, "before_cursor_execute", count)
    try:
        jobs = tomqueue.enqueue_many(
            [Record(ledger_path, f"{i:02d}" + "z" * 30_000) for i in range(20)]
        )
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) >= 2
    assert [j.id for j in jobs] == sorted(j.id for j in jobs)
    with get_engine(stack.config).connect() as conn:
        stored = dict(conn.execute(select(Job.id, Job.handler)).all())
    assert [stored[j.id] for j in jobs] == [j.handler for j in jobs]


@on_stacks(("mysql", "polling"))
def test_enqueue_many_of_one_long_handler_still_splits_under_the_packet_limit(
    stack: Stack, ledger_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same 30 kB handler twenty times: a long text the same in every row still travels
    with the rows (not as one parameter), so the statement splits as before."""
    from sqlalchemy import event

    from tomqueue import db

    monkeypatch.setitem(db._statement_limits, stack.config.database_url, 300_000)
    sizes: list[int] = []
    engine = get_engine(stack.config)

    def measure(_conn: object, _cursor: object, sql: str, params: object, *_: object) -> None:
        if "JSON_TABLE" in sql:
            sizes.append(sum(len(str(p)) for p in params))  # type: ignore[attr-defined]

    event.listen(engine, "before_cursor_execute", measure)
    try:
        jobs = tomqueue.enqueue_many([Record(ledger_path, "z" * 30_000)] * 20)
    finally:
        event.remove(engine, "before_cursor_execute", measure)
    assert len(sizes) >= 2 and max(sizes) < 300_000
    with get_engine(stack.config).connect() as conn:
        stored = dict(conn.execute(select(Job.id, Job.handler)).all())
    assert [stored[j.id] for j in jobs] == [j.handler for j in jobs]

