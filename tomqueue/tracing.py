"""Optional OpenTelemetry spans that link an enqueue to the job's runs.

With ``opentelemetry-api`` installed (``pip install 'tomqueue[otel]'``) and a tracer provider
set up by the application, ``enqueue`` runs in a PRODUCER span ``tomqueue enqueue <kind>``
and the notification carries that span's W3C ``traceparent`` (an AMQP header; the deferred
manager and a retry's follow-up keep it); each run of the job is a CONSUMER span ``tomqueue
perform <kind>``, a child of the enqueue span, with the job's id, queue and attempt. Without
the package, or without a provider, every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    import opentelemetry.propagate as propagate
    import opentelemetry.trace as trace
except ImportError:  # pragma: no cover - exercised where the package is missing
    trace = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]

TRACER_NAME = "tomqueue"


_active = False  # a real provider was seen: OpenTelemetry sets the global provider once
_MISSING = object()
# a provider named by the environment is loaded by the first get_tracer_provider()
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def active() -> bool:
    """True once the application has set a tracer provider (checked per enqueue).

    While none is set, OpenTelemetry's global is read instead of calling
    ``get_tracer_provider()``, which looks for OTEL_PYTHON_TRACER_PROVIDER in ``os.environ``
    each time (~2.5 µs, ~8 µs in an ``enqueue`` between two INSERTs). Where that global is
    gone (another OpenTelemetry version) the public call answers."""
    global _active
    if _active:
        return True
    if trace is None:
        return False
    if getattr(trace, "_TRACER_PROVIDER", _MISSING) is None and not _PROVIDER_FROM_ENV:
        return False
    provider = trace.get_tracer_provider()
    _active = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _active


@contextmanager
def enqueue_span(kind: str) -> Iterator[None]:
    if not active():
        yield
        return
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(f"tomqueue enqueue {kind}", kind=trace.SpanKind.PRODUCER):
        yield


def current_traceparent() -> str:
    """The current span's ``traceparent``, or "" when there is none."""
    if propagate is None:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@contextmanager
def perform_span(kind: str, traceparent: str, attributes: dict[str, Any]) -> Iterator[None]:
    if not active():
        yield
        return
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"tomqueue perform {kind}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={k: v for k, v in attributes.items() if v is not None},
    ) as span:
        try:
            yield
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise
