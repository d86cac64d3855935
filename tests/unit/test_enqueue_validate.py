"""Enqueue's first layer: validation of priority, queue, run_at and payload size."""

from __future__ import annotations

import importlib
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from tests.jobs import Mailer, Record, Urgent
from tomqueue import Config, EnqueueError, SerializationError
from tomqueue.enqueue import validate
from tomqueue.handler import dump
from tomqueue.message import Notification

enqueue_module = importlib.import_module("tomqueue.enqueue")  # the package's name is the function

CONFIG = Config()


def test_explicit_zero_priority_is_kept() -> None:
    config = Config(default_priority=5)
    assert validate(Record("/p", "m"), 0, None, None, config).priority == 0
    assert validate(Record("/p", "m"), None, None, None, config).priority == 5
    assert validate(Urgent("/p", "m", -3), None, None, None, config).priority == -3
    assert validate(Urgent("/p", "m", -3), 2, None, None, config).priority == 2


@pytest.mark.parametrize("priority", [True, "1", 1.5])
def test_priority_must_be_an_integer(priority: object) -> None:
    with pytest.raises(EnqueueError, match="priority"):
        validate(Record("/p", "m"), priority, None, None, CONFIG)  # type: ignore[arg-type]


def test_queue_precedence() -> None:
    assert validate(Mailer("/p", "m"), None, None, "billing", CONFIG).queue == "billing"
    assert validate(Mailer("/p", "m"), None, None, None, CONFIG).queue == "mail"
    assert validate(Record("/p", "m"), None, None, None, CONFIG).queue is None
    assert validate(Record("/p", "m"), None, None, "balance", CONFIG).queue is None


@pytest.mark.parametrize("queue", ["", "has space", "a.b", "x" * 65, "mail#", 5])
def test_bad_queue_names(queue: object) -> None:
    with pytest.raises(EnqueueError, match="queue"):
        validate(Record("/p", "m"), None, None, queue, CONFIG)  # type: ignore[arg-type]


def test_run_at_forms_are_naive_utc() -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    aware = datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert validate(Record("/p", "m"), None, aware, None, CONFIG).run_at == datetime(
        2030, 1, 1, 10, 0
    )
    naive = datetime(2030, 1, 1, 12, 0)
    assert validate(Record("/p", "m"), None, naive, None, CONFIG).run_at == naive
    delta = validate(Record("/p", "m"), None, timedelta(minutes=5), None, CONFIG).run_at
    assert timedelta(minutes=4) < delta - now < timedelta(minutes=6)
    seconds = validate(Record("/p", "m"), None, 60, None, CONFIG).run_at
    assert timedelta(seconds=50) < seconds - now < timedelta(seconds=70)


@pytest.mark.parametrize("run_at", ["tomorrow", True, object()])
def test_bad_run_at(run_at: object) -> None:
    with pytest.raises(EnqueueError, match="run_at"):
        validate(Record("/p", "m"), None, run_at, None, CONFIG)


def test_payload_without_perform() -> None:
    with pytest.raises(SerializationError, match="perform"):
        validate(object(), None, None, None, CONFIG)


def test_oversized_handler_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    enqueue_module = sys.modules["tomqueue.enqueue"]
    monkeypatch.setattr(enqueue_module, "MAX_HANDLER_BYTES", 1000)
    with pytest.raises(EnqueueError, match="limit"):
        validate(Record("/p", "x" * 2000), None, None, None, CONFIG)
    validate(Record("/p", "x" * 100), None, None, None, CONFIG)


class Rewriting(Record):
    """An ``enqueue`` hook that stores another payload's handler in its place."""

    def enqueue(self, job: Any) -> None:
        job.handler = dump(Mailer("/p", "m"))


@pytest.mark.parametrize(
    ("payload", "kind"),
    [(Record("/p", "m"), "tests.jobs:Record"), (Rewriting("/p", "m"), "tests.jobs:Mailer")],
)
def test_the_notification_names_the_stored_handlers_kind(
    monkeypatch: pytest.MonkeyPatch, payload: Record, kind: str
) -> None:
    """The kind named in the notification's headers is the stored handler's, also when an
    ``enqueue`` hook rewrote the handler after validation read the payload's kind."""
    published: list[Notification] = []

    def persist(job: Any, _target: object, _config: Config) -> None:
        job.id = 7

    def persist_many(jobs: list[Any], _target: object, _config: Config) -> None:
        for job in jobs:
            job.id = 8

    monkeypatch.setattr(enqueue_module, "persist", persist)
    monkeypatch.setattr(enqueue_module, "persist_many", persist_many)
    monkeypatch.setattr(enqueue_module, "publish", lambda notes, _config: published.extend(notes))
    config = Config(amqp_url="amqp://localhost/")
    enqueue_module.enqueue(payload, config=config)
    enqueue_module.enqueue_many([payload], config=config)
    assert [(note.job_id, note.kind) for note in published] == [(7, kind), (8, kind)]
