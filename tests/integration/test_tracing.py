"""Optional OpenTelemetry spans: an enqueue's span is the parent of every run of its job.

The tracer provider is global and can be set once per process: this module sets an SDK
provider with an in-memory exporter the first time it needs one (later tests then trace
too, which is harmless: the spans go to memory)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tomqueue
from tests.conftest import Stack, on_stacks, run_worker
from tests.jobs import Boom, Record
from tomqueue import tracing

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    if not tracing.active():
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


@on_stacks(("postgresql", "amqp"), ("mysql", "amqp"))
def test_a_run_is_a_child_of_its_enqueue(
    stack: Stack, ledger_path: str, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("web request") as request:
        job = tomqueue.enqueue(Record(ledger_path, "traced"))

    run_worker(stack.config, threads=1)

    [enqueued] = named(spans, "tomqueue enqueue")
    [performed] = named(spans, "tomqueue perform")
    assert enqueued.name == "tomqueue enqueue tests.jobs:Record"
    assert enqueued.kind is trace.SpanKind.PRODUCER
    assert enqueued.parent is not None
    assert enqueued.parent.span_id == request.get_span_context().span_id
    assert performed.name == "tomqueue perform tests.jobs:Record"
    assert performed.kind is trace.SpanKind.CONSUMER
    assert performed.parent is not None and enqueued.context is not None
    assert performed.parent.span_id == enqueued.context.span_id
    assert performed.context.trace_id == request.get_span_context().trace_id
    assert performed.attributes is not None
    assert performed.attributes["tomqueue.job_id"] == job.id
    assert performed.attributes["tomqueue.attempt"] == 1


@on_stacks(("postgresql", "amqp"))
def test_every_retry_stays_in_the_enqueue_trace(
    stack: Stack, ledger_path: str, spans: InMemorySpanExporter
) -> None:
    tomqueue.enqueue(Boom(ledger_path, "b", max_attempts=2, retry_now=True))

    run_worker(stack.config, threads=1)

    [enqueued] = named(spans, "tomqueue enqueue")
    runs = named(spans, "tomqueue perform")
    assert len(runs) == 2
    assert enqueued.context is not None
    assert {r.context.trace_id for r in runs} == {enqueued.context.trace_id}
    assert [r.attributes["tomqueue.attempt"] for r in runs] == [1, 2]  # type: ignore[index]
    assert all(r.status.status_code is trace.StatusCode.ERROR for r in runs)
    assert all(r.events and r.events[0].name == "exception" for r in runs)
