"""Invoke-layer decisions, without a database: hooks, outcome, backoff, max_attempts,
reschedule_at, destroy_failed_jobs, and password redaction in last_error and logs."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import ledger
from tests.jobs import Boom, Hooked
from tomqueue import Config, JobTimeout
from tomqueue.schema import Job
from tomqueue.transport.base import Delivery
from tomqueue.worker import invoke
from tomqueue.worker.outcome import Failed, Retry, Succeeded, format_error, redact
from tomqueue.worker.work import Context, Work

LOCKED_AT = datetime(2024, 1, 1, 12, 0, 0)


def make_work(payload: Any, attempts: int = 0, config: Config | None = None) -> Work:
    config = config or Config()
    ctx = Context(config, None, None, frozenset({"tests.jobs"}), "unit")  # type: ignore[arg-type]
    job = Job(id=1, priority=0, attempts=attempts, handler="{}", run_at=LOCKED_AT, version=1)
    work = Work(ctx, Delivery(b"", "normal"))
    work.job, work.payload, work.locked_at = job, payload, LOCKED_AT
    return work


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.txt")


def test_success_runs_hooks_in_order(path: str) -> None:
    work = make_work(Hooked(path, "h"))
    invoke.layer(work)
    assert work.outcome == Succeeded()
    assert [e.event for e in ledger.read(path)] == ["before", "perform", "success", "after"]


def test_failure_runs_error_and_after_hooks(path: str) -> None:
    work = make_work(Hooked(path, "h", fail=True))
    invoke.layer(work)
    assert isinstance(work.outcome, Retry)
    assert [e.event for e in ledger.read(path)] == ["before", "perform", "error", "after"]


@pytest.mark.parametrize("previous_attempts", [0, 1, 2, 5, 10])
def test_backoff_is_attempts_to_the_fourth_plus_five(path: str, previous_attempts: int) -> None:
    work = make_work(Boom(path, "b"), attempts=previous_attempts)
    outcome = invoke.failure_outcome(work, ValueError("x"), elapsed=2.0)
    attempts = previous_attempts + 1
    assert isinstance(outcome, Retry)
    expected = LOCKED_AT + timedelta(seconds=2.0 + attempts**4 + 5)
    assert outcome.run_at == expected
    assert work.job is not None and work.job.attempts == attempts


def test_custom_reschedule_at(path: str) -> None:
    class Custom(Boom):
        def reschedule_at(self, now: datetime, attempts: int) -> datetime:
            return now + timedelta(hours=attempts)

    work = make_work(Custom(path, "c"), attempts=2)
    outcome = invoke.failure_outcome(work, ValueError("x"), elapsed=0.0)
    assert isinstance(outcome, Retry) and outcome.run_at == LOCKED_AT + timedelta(hours=3)


def test_reschedule_at_returning_none_falls_back_to_backoff(path: str) -> None:
    work = make_work(Boom(path, "c"))  # its reschedule_at returns None unless retry_now
    outcome = invoke.failure_outcome(work, ValueError("x"), elapsed=0.0)
    assert isinstance(outcome, Retry) and outcome.run_at == LOCKED_AT + timedelta(seconds=6)


def test_config_max_attempts_fails_the_job_and_runs_failure_hook(path: str) -> None:
    config = Config(max_attempts=3)
    retry = invoke.failure_outcome(make_work(Boom(path, "m"), 1, config), ValueError("x"), 0)
    assert isinstance(retry, Retry)
    assert ledger.counts(path, "failure") == {}
    final = invoke.failure_outcome(make_work(Boom(path, "m"), 2, config), ValueError("x"), 0)
    assert isinstance(final, Failed) and final.destroy is False
    assert "ValueError: x" in final.error
    assert ledger.counts(path, "failure") == {"m": 1}


def test_payload_max_attempts_wins_over_config(path: str) -> None:
    config = Config(max_attempts=25)
    outcome = invoke.failure_outcome(
        make_work(Boom(path, "p", max_attempts=1), 0, config), ValueError("x"), 0
    )
    assert isinstance(outcome, Failed)


@pytest.mark.parametrize(
    ("config_destroy", "payload_destroy", "expected"),
    [(False, None, False), (True, None, True), (True, False, False), (False, True, True)],
)
def test_destroy_failed_jobs(
    path: str, config_destroy: bool, payload_destroy: bool | None, expected: bool
) -> None:
    config = Config(destroy_failed_jobs=config_destroy)
    payload = Boom(path, "d", max_attempts=1, destroy_failed_jobs=payload_destroy)
    outcome = invoke.failure_outcome(make_work(payload, 0, config), ValueError("x"), 0)
    assert isinstance(outcome, Failed) and outcome.destroy is expected


def test_unloadable_handler_fails_at_once_without_perform(path: str) -> None:
    work = make_work(None)
    work.load_error = "HandlerError: kind 'x:Y' is in module 'x', which ..."
    invoke.layer(work)
    assert isinstance(work.outcome, Failed)
    assert work.outcome.error.startswith("HandlerError")
    assert work.outcome.destroy is False


def test_last_error_has_type_message_and_traceback(path: str) -> None:
    work = make_work(Boom(path, "t", message="disk full"))
    invoke.layer(work)
    assert isinstance(work.outcome, Retry)
    error = work.outcome.error
    assert error.startswith("ValueError: disk full (t)\n")
    assert "Traceback (most recent call last)" in error
    assert "tests/jobs.py" in error and "in perform" in error


def test_format_error_is_bounded() -> None:
    text = format_error(ValueError("word " * 40_000))
    assert len(text) <= 65_000
    assert text.startswith("ValueError: word word")


def test_format_error_is_fast_for_a_long_token() -> None:
    started = time.monotonic()
    format_error(ValueError("A" * 25_000))
    assert time.monotonic() - started < 0.2


SECRET_DB = "postgresql+psycopg://app:Pg-S3cret-pw@db.internal/app"
SECRET_MQ = "amqp://app:Mq-S3cret-pw@mq.internal:5672/%2F"


@pytest.mark.parametrize(
    "message",
    [
        f"could not connect to {SECRET_DB}",
        f"broker {SECRET_MQ} refused",
        "the password is Pg-S3cret-pw, do not tell",
        "redis://:Mq-S3cret-pw@cache:6379/0 down",
    ],
)
def test_last_error_redacts_passwords(path: str, message: str) -> None:
    config = Config(database_url=SECRET_DB, amqp_url=SECRET_MQ)
    work = make_work(Boom(path, "r", message=message), config=config)
    invoke.layer(work)
    assert isinstance(work.outcome, Retry)
    assert "Pg-S3cret-pw" not in work.outcome.error
    assert "Mq-S3cret-pw" not in work.outcome.error
    assert "***" in work.outcome.error


def test_redact_keeps_urls_without_password() -> None:
    text = "see sqlite:///x.db and mysql+pymysql://root@127.0.0.1/x"
    assert redact(text) == text
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def test_failure_log_line_redacts_passwords(path: str, caplog: pytest.LogCaptureFixture) -> None:
    config = Config(database_url=SECRET_DB)
    work = make_work(Boom(path, "r", message=f"could not connect to {SECRET_DB}"), config=config)
    with caplog.at_level(logging.DEBUG, logger="tomqueue"):
        invoke.layer(work)
    assert caplog.records, "the failure should be logged"
    assert "Pg-S3cret-pw" not in caplog.text


def test_timeout_error_text(path: str) -> None:
    work = make_work(Boom(path, "x"))
    outcome = invoke.failure_outcome(work, JobTimeout("execution expired"), 1.0)
    assert isinstance(outcome, Retry) and outcome.error.startswith("JobTimeout: execution expired")


def test_delay_jobs_false_propagates_after_hooks(path: str) -> None:
    job = Job(id=None, priority=0, attempts=0, handler="{}", run_at=LOCKED_AT, version=1)
    with pytest.raises(ValueError):
        invoke.run_inline(job, Hooked(path, "i", fail=True), Config(delay_jobs=False))
    assert [e.event for e in ledger.read(path)] == ["before", "perform", "error", "after"]


@pytest.fixture
def lifecycle_calls() -> Any:
    from tomqueue import lifecycle

    calls: list[tuple[str, ...]] = []
    lifecycle.before("perform", lambda job, payload: calls.append(("before perform",)))
    lifecycle.after("perform", lambda job, payload: calls.append(("after perform",)))
    lifecycle.before("error", lambda job, exc: calls.append(("before error", str(exc))))
    lifecycle.before("failure", lambda job: calls.append(("before failure",)))
    yield calls
    lifecycle.reset()


def test_lifecycle_callbacks_run_around_perform(path: str, lifecycle_calls: list) -> None:
    """README: ``tomqueue.lifecycle.before("perform", fn)``, Delayed::Job's plugins."""
    invoke.layer(make_work(Hooked(path, "ok")))
    assert lifecycle_calls == [("before perform",), ("after perform",)]
    lifecycle_calls.clear()

    invoke.layer(make_work(Boom(path, "b", max_attempts=1)))
    assert lifecycle_calls == [
        ("before perform",),
        ("before error", "boom (b)"),
        ("before failure",),
    ]


def test_lifecycle_rejects_unknown_events() -> None:
    from tomqueue import lifecycle

    with pytest.raises(ValueError, match="unknown lifecycle event"):
        lifecycle.before("perfom", lambda: None)
